"""The worker of the two-rank SimCLR gathering test, in a module light enough for spawned processes to import."""
import torch


def gather_worker(rank, world, init_file, out_file):
    from helip.losses import SimCLRLoss

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    n = len(a) // world
    qa = a[rank * n:(rank + 1) * n].clone().requires_grad_()
    qb = b[rank * n:(rank + 1) * n].clone().requires_grad_()
    loss = SimCLRLoss(0.2)(qa, qb)   # rank and world size from the process group
    loss.backward()
    torch.save({"loss": loss.detach(), "ga": qa.grad, "gb": qb.grad}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()

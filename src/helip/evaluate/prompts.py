"""Class names and prompt templates for zero-shot classification.

Built in: ImageNet-1k's class names and the 80 prompt templates of OpenAI's
CLIP paper. They are not copied here: they come from OpenCLIP's
``open_clip.zero_shot_metadata`` (``IMAGENET_CLASSNAMES``,
``OPENAI_IMAGENET_TEMPLATES``), which took them from OpenAI's
"Prompt_Engineering_for_ImageNet.ipynb" notebook (github.com/openai/CLIP,
notebooks/). Using OpenCLIP's copy keeps helip's ImageNet numbers comparable
with OpenCLIP's and CLIP_benchmark's, which use the same lists.

Templates are ``str.format`` strings with one ``{}`` where the class name goes.
CLIP_benchmark's files write ``{c}`` instead; both are accepted. A template
without a placeholder would give every class the same prompt and a
chance-level classifier that looks like a real number, so it is refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import InputError

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def _openai_templates() -> List[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


def _simple_templates() -> List[str]:
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    return [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]


def _imagenet_classnames() -> List[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


# name -> (source description, loader)
BUILTIN_TEMPLATES = {"openai": ("OpenAI CLIP's 80 ImageNet templates (via open_clip.zero_shot_metadata)",
                                _openai_templates),
                     "simple": ("OpenCLIP's 2 simple ImageNet templates", _simple_templates)}
BUILTIN_CLASSNAMES = {"imagenet": ("ImageNet-1k class names of OpenAI CLIP (via open_clip.zero_shot_metadata)",
                                   _imagenet_classnames)}
# datasets whose names alone select built-in class names and templates
BUILTIN_DATASETS = {"imagenet": ("imagenet", "openai"), "imagenet1k": ("imagenet", "openai"),
                    "imagenet-1k": ("imagenet", "openai")}


def read_lines(path: Path, what: str) -> List[str]:
    """Non-empty stripped lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} file {path} does not exist.")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as e:
        raise InputError(f"{what} file {path} is not UTF-8 text ({e}).")
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"{what} file {path} is empty; put one entry per line.")
    return lines


def check_templates(templates: Sequence[str], source: str) -> List[str]:
    """Normalise ``{c}`` to ``{}`` and require exactly one placeholder per template."""
    out = []
    for i, t in enumerate(templates):
        t = t.replace("{c}", "{}")
        if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1:
            raise InputError(f"template {i + 1} of {source} ({t!r}) must contain exactly one '{{}}' (or '{{c}}') "
                             f"where the class name goes, and no other braces.")
        out.append(t)
    return out


def load_templates(spec: str) -> Tuple[List[str], str]:
    """Templates from a built-in name (``openai``, ``simple``) or a file; returns (templates, source)."""
    if spec in BUILTIN_TEMPLATES:
        desc, load = BUILTIN_TEMPLATES[spec]
        return load(), desc
    return check_templates(read_lines(Path(spec), "templates"), str(spec)), str(spec)


def load_classnames(spec: str) -> Tuple[List[str], str]:
    """Class names from a built-in name (``imagenet``) or a file, one per line in label order."""
    if spec in BUILTIN_CLASSNAMES:
        desc, load = BUILTIN_CLASSNAMES[spec]
        return load(), desc
    return read_lines(Path(spec), "class names"), str(spec)


def resolve_prompts(name: str, search_dirs: Sequence[Path], classnames: Optional[str] = None,
                    templates: Optional[str] = None, fallback_classnames: Optional[List[str]] = None
                    ) -> Dict[str, object]:
    """Pick class names and templates for dataset ``name``.

    Order: an explicit option, then ``classnames.txt`` /
    ``zeroshot_classification_templates.txt`` in the dataset's directories
    (CLIP_benchmark's layout), then the built-ins for a known dataset name
    (``imagenet``), then (class names only) ``fallback_classnames`` (an image
    folder's sub-folder names). No templates found is an error, not a guess.
    """
    builtin = BUILTIN_DATASETS.get(name.lower())

    def find(fname: str) -> Optional[Path]:
        for d in search_dirs:
            if (Path(d) / fname).is_file():
                return Path(d) / fname
        return None

    if classnames is None:
        found = find(CLASSNAMES_FILE)
        classnames = str(found) if found else (builtin[0] if builtin else None)
    if classnames is not None:
        names, names_src = load_classnames(classnames)
    elif fallback_classnames is not None:
        names, names_src = fallback_classnames, "sub-folder names"
    else:
        raise InputError(f"zero-shot {name}: no class names; put {CLASSNAMES_FILE} (one name per line, in label "
                         f"order) beside the data or pass --zeroshot-classnames {name}=FILE.")
    if templates is None:
        found = find(TEMPLATES_FILE)
        templates = str(found) if found else (builtin[1] if builtin else None)
    if templates is None:
        raise InputError(f"zero-shot {name}: no prompt templates; put {TEMPLATES_FILE} (one template with '{{}}' "
                         f"per line) beside the data or pass --zeroshot-templates {name}=FILE (or =openai for "
                         f"CLIP's 80 ImageNet templates).")
    temps, temps_src = load_templates(templates)
    return {"classnames": names, "templates": temps, "classnames_source": names_src, "templates_source": temps_src}

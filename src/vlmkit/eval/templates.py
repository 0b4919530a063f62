"""Prompt templates for zero-shot classification.

A template is a sentence with a "{}" where the class name goes. Averaging the text embeddings of
several templates (CLIP's prompt ensemble) is worth a few points of accuracy over the bare name.
"""

from pathlib import Path

from vlmkit.errors import ConfigError

# A small generic ensemble in the style of CLIP's ImageNet prompts; none is specific to one dataset.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a drawing of a {}.",
    "a rendering of a {}.",
    "a {}.",
)


def load_templates(values: list[str] | None) -> list[str]:
    """Resolve templates given on the command line or in a config.

    Each value is either a template containing "{}" or a path to a text file with one template per
    line (blank lines and lines starting with '#' are ignored). None or [] gives DEFAULT_TEMPLATES.
    Raises ConfigError for a template without "{}" or a file that holds no templates.
    """
    if not values:
        return list(DEFAULT_TEMPLATES)
    templates: list[str] = []
    for value in values:
        # "{}" is tested first: a long sentence is not a path, and is_file() can raise on it
        if "{}" in value:
            templates.append(value)
        elif Path(value).is_file():
            templates.extend(_read_template_file(Path(value)))
        else:
            raise ConfigError(
                f"template {value!r} has no '{{}}' placeholder for the class name and is not a file; "
                "write it like 'a photo of a {}.'"
            )
    return templates


def _read_template_file(path: Path) -> list[str]:
    templates = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise ConfigError(
                f"{path}:{lineno}: template {line!r} has no '{{}}' placeholder for the class name; "
                "add one, e.g. 'a photo of a {}.'"
            )
        templates.append(line)
    if not templates:
        raise ConfigError(
            f"{path}: no templates found; write one template per line, e.g. 'a photo of a {{}}.'"
        )
    return templates

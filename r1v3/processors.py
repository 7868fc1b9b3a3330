"""Load a checkpoint's processor as transformers does, and fill in what another program's save lacks.

Released and third-party checkpoints differ from r1v3's own: a processor class transformers does not
know (``AutoProcessor`` then returns a bare tokenizer, which would drop the images), no
``processor_config.json`` (the processor class is named in ``preprocessor_config.json``), no
video-processor file (needed by InternVL's and Qwen2.5-VL's processors where torchvision is
installed, absent where it is not). The trainer resolves these here, and the vLLM engine reads such
a directory through :func:`completed_checkpoint`, so both sides load the same processor.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from transformers import InternVLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor

from r1v3.errors import BackboneError

log = logging.getLogger(__name__)


class InternVLProcessorNoVideo(InternVLProcessor):
    """InternVL's processor without its video processor, which needs torchvision (absent on CPU-torch
    installs). Saved under the parent's name so real transformers installs load it as usual."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256,
                 chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    def to_dict(self):
        return super().to_dict() | {"processor_class": "InternVLProcessor"}


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor (see InternVLProcessorNoVideo)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        return super().to_dict() | {"processor_class": "Qwen2_5_VLProcessor"}


class Qwen3VLProcessorNoVideo(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor (see InternVLProcessorNoVideo)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        return super().to_dict() | {"processor_class": "Qwen3VLProcessor"}


_NO_VIDEO = {"InternVLProcessor": InternVLProcessorNoVideo,
             "Qwen2_5_VLProcessor": Qwen2_5_VLProcessorNoVideo,
             "Qwen3VLProcessor": Qwen3VLProcessorNoVideo}


def check_model_path(path: str | Path) -> None:
    """A path that looks local must exist; anything else is taken as a hub id."""
    local = Path(path)
    if not local.exists() and (str(path).startswith((".", "/", "~")) or local.suffix or len(local.parts) > 2):
        raise BackboneError(f"model directory {path} does not exist (build one with `r1v3 tiny --out {path}`)")


# Processors that insist on a video half, and the video processor type a minimal
# video_preprocessor_config.json names: where torchvision exists (vLLM's environment) the processor
# loads from that file alone, and writing it needs no torchvision.
VIDEO_PROCESSOR = {"InternVLProcessor": "InternVLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                   "Qwen3VLProcessor": "Qwen3VLVideoProcessor"}
VIDEO_FILE = "video_preprocessor_config.json"


def save_processor(processor, out: str | Path) -> None:
    """``save_pretrained``, plus the video-processor file a processor saved without torchvision
    lacks: an export from the core environment then loads in vLLM's (which has torchvision)."""
    out = Path(out)
    processor.save_pretrained(str(out))
    name = saved_processor_class(out)
    if name in VIDEO_PROCESSOR and not (out / VIDEO_FILE).exists():
        (out / VIDEO_FILE).write_text(json.dumps({"video_processor_type": VIDEO_PROCESSOR[name]}))


def saved_processor_class(path: str | Path) -> str | None:
    """The processor class a checkpoint names, where transformers looks for it: processor_config.json
    (newer saves), else preprocessor_config.json or tokenizer_config.json (the hub's Qwen2.5-VL and
    most older checkpoints have no processor_config.json)."""
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        config = Path(path) / file
        name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
        if name:
            return name
    return None


def needs_video_file(path: str | Path) -> str | None:
    """The processor class of a checkpoint whose processor needs a video-processor file it lacks."""
    name = saved_processor_class(path)
    return name if name in VIDEO_PROCESSOR and not (Path(path) / VIDEO_FILE).exists() else None


# The processor class of each family r1v3 knows, by the model config's model_type.
_FAMILY_PROCESSOR = {"internvl": "InternVLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                     "qwen2_vl": "Qwen2VLProcessor", "qwen3_vl": "Qwen3VLProcessor",
                     "qwen3_vl_moe": "Qwen3VLProcessor", "llava": "LlavaProcessor"}


def model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a local checkpoint's config.json (None without one)."""
    model_file = Path(path) / "config.json"
    return json.loads(model_file.read_text()).get("model_type") if model_file.is_file() else None


def load_processor(path: str | Path, trust_remote_code: bool = False):
    """The checkpoint's processor, as transformers loads it; where that yields no image processor
    (a processor class transformers does not know, so ``AutoProcessor`` returns a bare tokenizer),
    the model config's ``model_type`` picks the family's processor instead, with one warning."""
    from transformers import AutoProcessor

    check_model_path(path)
    no_torchvision = importlib.util.find_spec("torchvision") is None
    saved = saved_processor_class(path)
    if no_torchvision and saved in _NO_VIDEO:
        return _NO_VIDEO[saved].from_pretrained(str(path))
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ImportError) as err:  # "Can't load video processor": the file is optional for training
        name = needs_video_file(path)
        if name not in _NO_VIDEO:
            raise
        log.warning("[r1v3] %s: no %s (%s); loading %s without its video half", path, VIDEO_FILE,
                    str(err).splitlines()[0][:80], name)
        return _NO_VIDEO[name].from_pretrained(str(path))
    if hasattr(processor, "image_processor"):
        return processor
    family = model_type(path)
    name = _FAMILY_PROCESSOR.get(family)
    if name is None:
        return processor  # the stage refuses it if the data has images (r1v3.encoding)
    import transformers

    family_class = _NO_VIDEO[name] if no_torchvision and name in _NO_VIDEO else getattr(transformers, name)
    log.warning("[r1v3] %s: AutoProcessor gave a %s without an image processor; loading %s for model_type %r",
                path, type(processor).__name__, family_class.__name__, family)
    try:
        return family_class.from_pretrained(str(path))
    except (AttributeError, OSError, TypeError, ValueError) as err:
        raise BackboneError(f"{path}: its processor class is unknown and the {family} family's ({name}) does not "
                            f"load from its files either ({str(err).splitlines()[0][:120]}); save the checkpoint's "
                            "processor with a transformers processor class") from None


def completed_checkpoint(path: str | Path, out: str | Path) -> list[str]:
    """Fill ``out`` with links to ``path``'s files plus what another program's processor needs to
    load as r1v3's does: the family's processor class where the saved one is unknown to
    transformers (the fallback of :func:`load_processor`), and a video-processor file where the
    family's processor requires one. The checkpoint itself is never written to. Returns what was
    added (empty: ``path`` needs nothing, and ``out`` is left empty)."""
    import transformers

    path, out = Path(path), Path(out)
    name, added = saved_processor_class(path), {}
    family_class = _FAMILY_PROCESSOR.get(model_type(path))
    if family_class and (name is None or not hasattr(transformers, name)):
        config = path / "processor_config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        added["processor_config.json"] = saved | {"processor_class": family_class}
        name = family_class
    if name in VIDEO_PROCESSOR and not (path / VIDEO_FILE).exists():
        added[VIDEO_FILE] = {"video_processor_type": VIDEO_PROCESSOR[name]}
    if not added:
        return []
    out.mkdir(parents=True, exist_ok=True)
    for file in path.iterdir():
        if file.name not in added:
            (out / file.name).symlink_to(file.resolve())
    for file, content in added.items():
        (out / file).write_text(json.dumps(content, indent=1))
    return [f"{file} ({json.dumps(content)[:80]})" for file, content in added.items()]

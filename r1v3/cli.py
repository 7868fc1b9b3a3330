"""The ``r1v3`` command: LightningCLI for fit/validate/test/predict, plus tool subcommands."""

from __future__ import annotations

import logging
import os
import sys

TOOLS = {
    "tiny": ("r1v3.tiny", "tiny_main", "build a random tiny VLM offline (model + tokenizer + processor)"),
    "synth": ("r1v3.data_modules.synthetic", "synth_main", "render the synthetic visual-math shards"),
    "shards": ("r1v3.data_modules.shards", "shards_main", "convert JSONL/MMMU/geometry3k records to shards"),
    "demo": ("r1v3.demo", "demo_main", "the embedded CPU demo: tiny model, synthetic data, SFT + control, GRPO"),
    "ablate": ("r1v3.ablations", "ablate_main", "the paper's ablations in miniature, with verdicts"),
    "rejection-sample": ("r1v3.rejection", "rejection_main", "build SFT shards from verified samples of a model"),
    "report": ("r1v3.report", "report_main", "plot a run's curves (PNG) and write a markdown summary"),
}
STAGES = "fit, validate, test, predict"


def _run_tool(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = TOOLS[name]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def _help() -> str:
    lines = ["usage: r1v3 {fit,validate,test,predict} --config CONFIG.yaml [--section.key value ...]",
             "       r1v3 {" + ",".join(TOOLS) + "} [options]", "",
             f"Lightning stages ({STAGES}): see `r1v3 fit --help`; `--print_config` shows the full config.",
             "Tools:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in TOOLS.items()]
    return "\n".join(lines)


class R1V3CLI:
    """Thin factory so tests and the demo can run the CLI in-process with an argument list."""

    @staticmethod
    def run(argv: list[str] | None):
        import warnings

        from lightning.pytorch import LightningDataModule
        from lightning.pytorch.cli import LightningCLI

        from r1v3.stages.base import R1V3Module

        # In-process callers (demo, tests) pass argv while sys.argv holds their own command line.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        return LightningCLI(
            R1V3Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, args=argv,
            parser_kwargs={"description": "r1v3: visual-reasoning post-training (SFT, GRPO, connector)"},
        )


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    r1v3_log = logging.getLogger("r1v3")
    if not r1v3_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        r1v3_log.addHandler(handler)
        r1v3_log.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0
    if argv[0] in TOOLS:
        return _run_tool(argv[0], argv[1:])
    try:
        R1V3CLI.run(None if from_shell else argv)
    except (ValueError, OSError) as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"r1v3: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _user_error(err: BaseException) -> BaseException | None:
    """The configuration mistake behind ``err``, if any: jsonargparse wraps errors raised while
    instantiating the config's classes, so follow the cause chain."""
    from r1v3.backbone import BackboneError
    from r1v3.data_modules.collate import PromptTooLongError
    from r1v3.stages.base import NonFiniteError

    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, (BackboneError, PromptTooLongError, NonFiniteError, FileNotFoundError)):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


if __name__ == "__main__":
    sys.exit(main())

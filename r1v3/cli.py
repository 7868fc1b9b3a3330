"""The ``r1v3`` command: LightningCLI for fit/validate/test/predict, plus tool subcommands.

A user's mistake ends in one ``r1v3: error:`` line and exit code 2: a misspelled key (with the
closest valid one), a value of the wrong type, or an error raised while the config's classes are
built (a model that fails to load, a bad setting), unwrapped from jsonargparse's messages.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys

TOOLS = {
    "tiny": ("r1v3.tools.tiny", "tiny_main", "build a random tiny VLM offline (model + tokenizer + processor)"),
    "synth": ("r1v3.tools.datasets", "synth_main", "render the synthetic visual-math shards"),
    "shards": ("r1v3.tools.datasets", "shards_main", "convert JSONL/MMMU/geometry3k records to shards"),
    "demo": ("r1v3.tools.demo", "demo_main", "the embedded CPU demo: tiny model, synthetic data, SFT + control, GRPO"),
    "ablate": ("r1v3.tools.ablations", "ablate_main", "the paper's ablations in miniature, with verdicts"),
    "rejection-sample": ("r1v3.tools.rejection", "rejection_main", "build SFT shards from verified samples of a model"),
    "shapes": ("r1v3.tools.shapes", "shapes_main", "parameters per module group and FSDP units, on the meta device"),
    "plan": ("r1v3.tools.plan", "plan_main", "per-rank memory of a run from its config, and whether it fits"),
    "report": ("r1v3.tools.report", "report_main", "plot a run's curves (PNG) and write a markdown summary"),
}
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _run_tool(name: str, argv: list[str]) -> int:
    import importlib

    module, func, _ = TOOLS[name]
    return int(getattr(importlib.import_module(module), func)(argv) or 0)


def _help() -> str:
    lines = ["usage: r1v3 {fit,validate,test,predict} --config CONFIG.yaml [--section.key value ...]",
             "       r1v3 {" + ",".join(TOOLS) + "} [options]", "",
             f"Lightning stages ({', '.join(SUBCOMMANDS)}): see `r1v3 fit --help`; `--print_config` shows the "
             "full config.", "Tools:"]
    lines += [f"  {name:<8} {desc}" for name, (_, _, desc) in TOOLS.items()]
    return "\n".join(lines)


def _causes(err: BaseException | None) -> list[BaseException]:
    chain = []
    while err is not None and len(chain) < 30:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _class_keys(class_path: str) -> list[str]:
    """Every key a class's init arguments take, nested dataclass fields included (``optimizer.lr``)."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    try:
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(getattr(importlib.import_module(module), name), fail_untyped=False)
    except Exception:  # noqa: BLE001 - suggestions are a courtesy; the error line stands without them
        return []
    return [a.dest for a in parser._actions if a.dest != "help"]


def _parser_keys(parser) -> list[str]:
    keys = []
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            keys.append(action.dest)
        for sub in (getattr(action, "_name_parser_map", None) or {}).values():
            keys += _parser_keys(sub)
    return keys


def config_error_line(err: BaseException, parser=None) -> str:
    """One line for a jsonargparse error: the key, what is wrong with it, the closest valid key."""
    chain = _causes(err)
    texts = [str(c) for c in chain]
    sections = list(dict.fromkeys(m.group(1) for t in texts for m in [re.match(r'Parser key "([^"]+)"', t)] if m))
    class_path = next((m.group(1) for t in texts for m in [re.search(r"given class_path '([^']+)'", t)] if m), None)
    unknown_patterns = (r"Option '([^']+)' is not accepted", r"does not accept option '([\w.]+)'",
                        r"unrecognized arguments:.*?--([\w.]+)")
    unknown = next((m.group(1) for t in texts for p in unknown_patterns for m in [re.search(p, t)] if m), None)
    where = sections[0] if sections else ""
    if unknown is not None:
        prefix = f"{where}.init_args." if class_path and where else ""
        if class_path:
            valid, key = _class_keys(class_path), unknown.split("init_args.")[-1]
        else:
            valid, key = (_parser_keys(parser) if parser is not None else []), unknown
        full = prefix + key
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        owner = f" of {class_path.rpartition('.')[2]}" if class_path else ""
        return f"unknown key '{full}'{owner}{hint}"
    type_pattern = r"Expected a <class '([\w.]+)'>\. Got value: (.*)"
    typed = next((m for t in texts for m in [re.search(type_pattern, t)] if m), None)
    if typed is not None:
        inner = sections[-1] if sections else ""
        key = inner if len(sections) < 2 else f"{sections[0]}.init_args.{inner}"
        return f"'{key}' expects {typed.group(1)}, got {typed.group(2).strip()!r}"
    innermost = texts[-1].strip().splitlines()
    return f"{'.'.join(sections) + ': ' if sections else ''}{innermost[0] if innermost else type(chain[-1]).__name__}"


def _make_cli_class():
    from lightning.pytorch.cli import LightningCLI

    from r1v3.errors import UserError

    class R1V3CLI(LightningCLI):
        """LightningCLI whose parse errors become one-line ``UserError``s and whose step-bounded runs
        show a progress bar in steps."""

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except Exception as err:  # noqa: BLE001 - jsonargparse raises argparse.ArgumentError and kin
                sub = next((a for a in (args or sys.argv[1:]) if a in SUBCOMMANDS), None)
                subparsers = getattr(parser, "_subcommands_action", None)
                sub_parser = subparsers._name_parser_map.get(sub) if subparsers and sub else parser
                raise UserError(config_error_line(err, sub_parser)) from err

        def _instantiate_trainer(self, config, callbacks):
            from lightning.pytorch.callbacks import ProgressBar

            from r1v3.callbacks.progress import StepProgressBar

            own = [c for c in (config.get("callbacks") or []) + callbacks if isinstance(c, ProgressBar)]
            if not own and config.get("enable_progress_bar", True) is not False:
                callbacks = [*callbacks, StepProgressBar()]
            return super()._instantiate_trainer(config, callbacks)

    return R1V3CLI


class R1V3CLI:
    """Thin factory so tests and the demo can run the CLI in-process with an argument list."""

    @staticmethod
    def run(argv: list[str] | None):
        import warnings

        from lightning.pytorch import LightningDataModule

        from r1v3.stages.base import R1V3Module

        # In-process callers (demo, tests) pass argv while sys.argv holds their own command line.
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        quiet = {"exit_on_error": False}  # errors come back to us as exceptions: one line, no usage dump
        return _make_cli_class()(
            R1V3Module, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, args=argv,
            parser_kwargs={**quiet, **{sub: dict(quiet) for sub in SUBCOMMANDS},
                           "description": "r1v3: visual-reasoning post-training (SFT, GRPO, connector)"},
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
    if "--plan" in argv:  # `r1v3 fit ... --plan`: refuse a run that cannot fit, before any weight loads
        argv.remove("--plan")
        from r1v3.tools.plan import PlanError, check_before_fit

        try:
            problem = check_before_fit(argv[1:])
        except PlanError as err:
            problem = f"plan: {err}"
        if problem:
            print(f"r1v3: error: {problem}", file=sys.stderr)
            return 2
        from_shell = False
    try:
        R1V3CLI.run(None if from_shell else argv)
    except Exception as err:  # noqa: BLE001 - only user mistakes are caught; the rest re-raises
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"r1v3: error: {user_error}", file=sys.stderr)
        return 2
    return 0


def _user_error(err: BaseException) -> str | None:
    """The one line for a user's mistake behind ``err``, if it is one: jsonargparse wraps errors
    raised while it builds the config's classes, so the cause chain is followed."""
    from r1v3.errors import UserError
    from r1v3.stages.health import DivergedError

    for cause in _causes(err):
        if isinstance(cause, (UserError, DivergedError, FileNotFoundError)):
            return str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    wrapped = [c for c in _causes(err) if "Union subtypes" in str(c) or "Problem with given class_path" in str(c)]
    if wrapped:  # building a configured class failed: show the underlying error, not the config dump
        inner = _causes(err)[-1]
        lines = str(inner).strip().splitlines()
        return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


if __name__ == "__main__":
    sys.exit(main())

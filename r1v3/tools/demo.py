"""The embedded CPU demo: the three Skywork-R1V3 stages on a tiny InternVL and synthetic visual math.

1. SFT, as configured (configs/demo/sft.yaml).
2. The same SFT as a control whose training questions are paired with other samples' images.
   Validation always uses the right images, so the control shows what the model reaches from the
   question text alone.
3. GRPO (configs/demo/grpo.yaml) from the SFT run's HF export, with the monitoring callbacks.
4. Connector-only tuning (configs/demo/connector.yaml) from the GRPO run's HF export.
5. ``r1v3 report`` over the whole run: report.png and report.md in the work directory.

The demo passes when SFT beats chance and the control, GRPO beats its SFT starting point, and the
connector stage leaves every weight outside the connector bit-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from r1v3.data_modules import synthetic

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "demo" / "sft.yaml"
DEFAULT_GRPO_CONFIG = REPO / "configs" / "demo" / "grpo.yaml"
DEFAULT_CONNECTOR_CONFIG = REPO / "configs" / "demo" / "connector.yaml"


def chance_accuracy(val_dir: Path) -> float:
    """Expected accuracy of uniform guessing over each validation question's answer space."""
    from r1v3.data_modules.webdata import ShardStream, load_sources

    stream = ShardStream(load_sources(str(val_dir)), batch_size=64, shuffle=False, drop_last=False)
    odds = []
    for batch in stream:
        for s in batch["samples"]:
            if s.get("options"):
                odds.append(1 / len(s["options"]))
            else:
                odds.append(1 / synthetic.answer_space_size(s["subject"], s.get("difficulty") or 1))
    return sum(odds) / max(len(odds), 1)


def changed_groups(before: Path, after: Path) -> list[str]:
    """Module groups (vision, connector, llm) with any weight that differs between two HF exports."""
    from r1v3.backbone import load_backbone

    old, new = load_backbone(before), load_backbone(after)
    params = dict(new.model.named_parameters())
    changed = {group for group, named in old.group_parameters().items()
               for name, p in named if not p.equal(params[name])}
    return sorted(changed)


def run_stage(config: Path, workdir: Path, name: str, steps: int | None, extra: list[str],
              model_dir: Path | None = None, command: str = "fit") -> dict:
    """``r1v3 fit`` (or ``validate``) in-process with the demo's paths; returns the val metrics."""
    from r1v3.cli import R1V3CLI

    root = workdir / name
    argv = [command, "--config", str(config),
            *(["--trainer.max_steps", str(steps)] if steps else []),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.callbacks.init_args.dirpath", str(root / "checkpoints"),
            "--model.init_args.model_path", str(model_dir or workdir / "model"),
            "--model.init_args.export_dir", str(root / "hf"),
            "--data.init_args.train", str(workdir / "data" / "train"),
            "--data.init_args.val", str(workdir / "data" / "val"), *extra]
    started = time.perf_counter()
    cli = R1V3CLI.run(argv)
    steps_done = cli.trainer.global_step if command == "fit" else 0
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    return metrics | {"seconds": round(time.perf_counter() - started, 1), "steps": steps_done}


def demo_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r1v3 demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/demo", help="where model, data and runs go")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--grpo-config", default=str(DEFAULT_GRPO_CONFIG))
    parser.add_argument("--steps", type=int, default=None, help="override the SFT trainer.max_steps")
    parser.add_argument("--grpo-steps", type=int, default=None, help="override the GRPO trainer.max_steps")
    parser.add_argument("--no-grpo", action="store_true", help="stop after SFT (and its control)")
    parser.add_argument("--grpo-arg", action="append", default=[],
                        help="extra argument for the GRPO run, e.g. --grpo-arg=--trainer.val_check_interval=20")
    parser.add_argument("--connector-config", default=str(DEFAULT_CONNECTOR_CONFIG))
    parser.add_argument("--connector-steps", type=int, default=None,
                        help="override the connector stage's trainer.max_steps")
    parser.add_argument("--no-connector", action="store_true", help="stop after GRPO")
    parser.add_argument("--connector-arg", action="append", default=[],
                        help="extra argument for the connector run, e.g. --connector-arg=--trainer.val_check_interval=10")
    parser.add_argument("--tasks", default=None, help="comma-separated synthetic tasks (default: all)")
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-control", action="store_true", help="skip the shuffled-image control")
    parser.add_argument("overrides", nargs="*", help="extra LightningCLI arguments, e.g. --trainer.max_steps=100")
    args, unknown = parser.parse_known_args(argv)
    overrides = args.overrides + unknown

    from r1v3.tools.tiny import build_tiny

    workdir = Path(args.workdir)
    if not (workdir / "model" / "config.json").exists():
        build_tiny("internvl", workdir / "model", seed=args.seed)
    if not (workdir / "data" / "val").exists():
        tasks = tuple(args.tasks.split(",")) if args.tasks else synthetic.DEFAULT_TRAIN_TASKS
        synthetic.write_synthetic(workdir / "data", n_train=args.n_train, n_val=args.n_val, n_ood=args.n_val,
                                  seed=args.seed, train_tasks=tasks)
    extra = ["--seed_everything", str(args.seed), "--data.init_args.seed", str(args.seed), *overrides]
    report = {"chance": round(chance_accuracy(workdir / "data" / "val"), 3)}
    report["sft"] = run_stage(Path(args.config), workdir, "sft", args.steps, extra)
    if not args.no_control:
        report["control_shuffled_images"] = run_stage(
            Path(args.config), workdir, "control", args.steps,
            [*extra, "--data.init_args.shuffle_images_control", "true"])
    acc = report["sft"].get("val/accuracy", 0.0)
    beats = [acc > report["chance"]]
    if "control_shuffled_images" in report:
        beats.append(acc > report["control_shuffled_images"].get("val/accuracy", 1.0))
    report["reads_the_image"] = all(beats)
    ok = report["reads_the_image"]
    if not args.no_grpo:
        # GRPO validates by the paper's protocol (samples at temperature 1.0), so its starting
        # point is measured the same way rather than taken from the SFT run's greedy score.
        grpo_extra = ["--seed_everything", str(args.seed), "--data.init_args.seed", str(args.seed),
                      "--model.init_args.rollout_seed", str(args.seed), *args.grpo_arg]
        # The HF engine samples the same distribution; one vLLM engine per process is what vLLM
        # supports (a second in-process engine did not receive weight pushes in our runs).
        report["grpo_start"] = run_stage(Path(args.grpo_config), workdir, "grpo_start", None,
                                         [*grpo_extra, "--model.init_args.rollout", "hf"],
                                         model_dir=workdir / "sft" / "hf", command="validate")
        report["grpo"] = run_stage(Path(args.grpo_config), workdir, "grpo", args.grpo_steps, grpo_extra,
                                   model_dir=workdir / "sft" / "hf")
        report["grpo_gain"] = round(report["grpo"].get("val/accuracy", 0.0)
                                    - report["grpo_start"].get("val/accuracy", 0.0), 4)
        ok = ok and report["grpo_gain"] > 0
        if not args.no_connector:
            report["connector"] = run_stage(Path(args.connector_config), workdir, "connector", args.connector_steps,
                                            [*extra, *args.connector_arg], model_dir=workdir / "grpo" / "hf")
            changed = changed_groups(workdir / "grpo" / "hf", workdir / "connector" / "hf")
            report["connector"]["changed_groups"] = changed
            ok = ok and changed == ["connector"]
    from r1v3.tools.report import build_report

    built = build_report(workdir)
    report["report"] = {"png": str(built["png"]), "markdown": str(built["markdown"])}
    print(json.dumps(report, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(demo_main())

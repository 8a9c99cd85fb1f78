"""`spo plot`: runs overlaid per panel with their labels, log-ratios in nats, experiment folders by seed,
smoothing, NaN gaps, damaged metrics.jsonl files, PNG and SVG. The figure is read back from matplotlib."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from spo_align.cli import app
from spo_align.plots.compare import build_figure, draw, plot_runs, smooth, write_experiment_curves
from spo_align.plots.metrics import read_metrics_file
from spo_align.plots.runs import PlotError, load_runs

ROOT = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30)
# Reward scale of each tiny recipe: beta, or 2 tau for IPO (match_spo_beta 0.2 -> tau 0.1).
SCALE = {"dpo": 0.1, "kto": 0.1, "ipo": 0.2, "spo": 0.2}
CHOSEN = {"dpo": -1.0, "kto": -0.5, "ipo": 0.5, "spo": 1.0}  # log-ratio (nats) per step, times the step index


def _resolved(folder: Path, recipe: str, *overrides: str) -> None:
    """The run's resolved_recipe.yaml, written by the real loader and resolver."""
    from spo_align.recipe.load import load_recipe, save_resolved
    from spo_align.recipe.resolve import resolve

    path = ROOT / "recipes" / "tiny" / f"{recipe}.yaml"
    plan = resolve(load_recipe(path, [*overrides, f"output.dir={folder}"]), path, "cpu")
    save_resolved(plan, folder / "resolved_recipe.yaml")


def _records(kind: str) -> list[dict[str, Any]]:
    """What the runner logs for each stage (KTO: TRL's names, no accuracies or both_below_ref)."""
    records: list[dict[str, Any]] = []
    for i, step in enumerate(STEPS, start=1):
        record: dict[str, Any] = {"step": step, "epoch": 0.1 * i, "loss": 1.0 / i, "learning_rate": 1e-4}
        if kind != "sft":
            chosen, rejected = CHOSEN[kind] * i, -2.0 * i
            scale = SCALE[kind]
            record |= {"rewards/chosen": scale * chosen, "rewards/rejected": scale * rejected,
                       "rewards/margins": scale * (chosen - rejected), "logps/chosen": -3.0, "logps/rejected": -4.0}
        if kind in ("dpo", "ipo", "spo"):
            record |= {"rewards/accuracies": 0.5, "both_below_ref": 0.25}
        if kind == "spo":
            record |= {"spo_margin_term": -0.3, "spo_rejected_term": -0.2}
        if kind == "kto":
            record |= {"kl": 0.05}
        records.append(record)
    records.append({"step": STEPS[-1], "train_runtime": 1.0, "train_loss": 0.5, "epoch": 1.0})  # closing summary
    return records


def _write_run(folder: Path, kind: str, records: list[dict[str, Any]] | None = None, *overrides: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _resolved(folder, kind, *overrides)
    lines = [json.dumps(r) for r in (records if records is not None else _records(kind))]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def _experiment(tmp_path: Path, seeds: tuple[int, ...] = (0, 1)) -> Path:
    """The layout `spo experiment` writes: seed<S>/<stage>/ run folders beside generations/."""
    out = tmp_path / "exp"
    for seed in seeds:
        for kind in ("sft", "dpo", "kto", "ipo", "spo"):
            _write_run(out / f"seed{seed}" / kind, kind, None, f"training.seed={seed}")
        (out / f"seed{seed}" / "generations").mkdir()
    return out


def _panels(fig: Any) -> dict[str, list[tuple[str, list[float], list[float], str]]]:
    """title -> [(label, x, y, linestyle)] of every labelled line, read back from the drawn figure."""
    panels = {}
    for ax in fig.axes:
        if ax.get_title():
            panels[ax.get_title()] = [
                (line.get_label(), list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
                for line in ax.get_lines() if not line.get_label().startswith("_")
            ]
    return panels


def _labels(panel: list[tuple[str, list[float], list[float], str]]) -> list[str]:
    return [label for label, *_ in panel]


LABELS = ["dpo β=0.1 ε=0.1", "ipo τ=0.1", "kto β=0.1", "spo β=0.2 α=1"]


def test_experiment_folder_overlays_its_seeds_preference_runs_with_log_ratios_in_nats(tmp_path: Path) -> None:
    exp = _experiment(tmp_path)
    runs = load_runs([exp])
    assert [r.folder for r in runs] == [exp / "seed0" / k for k in ("dpo", "ipo", "kto", "spo")]  # no sft
    assert [r.label for r in runs] == LABELS
    assert [r.folder.parent.name for r in load_runs([exp], seed=1)] == ["seed1"] * 4

    fig = draw(build_figure(runs, "exp, seed 0"))
    panels = _panels(fig)
    assert list(panels) == [
        "chosen answer: log π/π_ref", "rejected answer: log π/π_ref", "margin: chosen − rejected log-ratio",
        "reward accuracy (chosen > rejected)", "both answers below the reference",
        "KTO reference point z₀ (kl)", "SPO margin term f(β·Δ)", "SPO rejected term f(α·(log π_ref − log π))",
    ]
    chosen = panels["chosen answer: log π/π_ref"]
    assert _labels(chosen) == LABELS
    for (_label, x, y, style), kind in zip(chosen, ("dpo", "ipo", "kto", "spo")):
        assert x == list(STEPS) and style == "-"
        assert y == pytest.approx([CHOSEN[kind] * i for i in (1, 2, 3)])  # reward / scale: the same nats for any β
    assert panels["rejected answer: log π/π_ref"][0][2] == pytest.approx([-2.0, -4.0, -6.0])
    assert panels["margin: chosen − rejected log-ratio"][3][2] == pytest.approx([3.0, 6.0, 9.0])
    assert "nats" in fig.axes[0].get_ylabel() and "β" in fig.axes[0].get_ylabel()
    assert _labels(panels["reward accuracy (chosen > rejected)"]) == [LABELS[0], LABELS[1], LABELS[3]]  # KTO logs none
    assert "loss" not in panels  # IPO's loss starts near 25, the others near 1: not one axis
    assert _labels(_panels(draw(build_figure(runs, "all", every_curve=True)))["loss"]) == LABELS
    colours = {label: colour for label, colour in zip(LABELS, ("tab:red", "tab:green", "tab:orange", "tab:blue"))}
    assert all(line.get_color() == colours[line.get_label()] for line in fig.axes[0].get_lines()
               if not line.get_label().startswith("_"))
    assert _labels(panels["KTO reference point z₀ (kl)"]) == ["kto β=0.1"]
    assert _labels(panels["SPO margin term f(β·Δ)"]) == ["spo β=0.2 α=1"]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == LABELS and legend.get_title().get_text() == "exp, seed 0"


def test_spo_plot_writes_png_and_svg_for_the_chosen_seed(tmp_path: Path) -> None:
    exp = _experiment(tmp_path)
    out = tmp_path / "figs" / "tiny.png"
    result = CliRunner().invoke(app, ["plot", str(exp), "--seed", "1", "--svg", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(out), str(out.with_suffix(".svg"))]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = out.with_suffix(".svg").read_text(encoding="utf-8")
    assert "<svg" in svg and "seed 1" in svg
    first = out.read_bytes()
    again = CliRunner().invoke(app, ["plot", str(exp), "--seed", "1", "--svg", "--out", str(out)])
    assert again.exit_code == 0 and out.read_bytes() == first  # no timestamp: the same figure, the same bytes
    assert out.with_suffix(".svg").read_text(encoding="utf-8") == svg
    default = CliRunner().invoke(app, ["plot", str(exp)])
    assert default.exit_code == 0 and (exp / "curves_seed0.png").is_file() and not (exp / "curves_seed0.svg").exists()
    svg_only = CliRunner().invoke(app, ["plot", str(exp / "seed0" / "spo"), "--out", str(tmp_path / "spo.svg")])
    assert svg_only.exit_code == 0 and "<svg" in (tmp_path / "spo.svg").read_text(encoding="utf-8")


def test_several_run_folders_overlay_and_shared_labels_get_their_folder_names(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", "spo")
    b = _write_run(tmp_path / "b", "spo")
    c = _write_run(tmp_path / "c", "spo", None, "loss.beta=0.5")
    runs = load_runs([a, b, c])
    assert [r.label for r in runs] == ["spo β=0.2 α=1 (a)", "spo β=0.2 α=1 (b)", "spo β=0.5 α=1"]
    result = CliRunner().invoke(app, ["plot", str(a), str(b), str(c)])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "curves.png")]  # the runs' common folder
    other = _write_run(tmp_path / "elsewhere" / "d", "dpo")
    apart = CliRunner().invoke(app, ["plot", str(a), str(other)])
    assert apart.exit_code == 1 and "--out" in apart.output


def test_each_loss_keeps_its_colour_unless_it_appears_twice() -> None:
    from spo_align.plots.compare import run_colours

    assert run_colours(["dpo", "spo"]) == ("tab:red", "tab:blue")
    assert run_colours(["spo", "spo", "dpo", None]) == ("tab:blue", "tab:green", "tab:red", "tab:orange")


def test_smoothing_keeps_constants_and_monotone_steps_and_stops_at_gaps() -> None:
    assert smooth([0.75] * 9, 4) == pytest.approx([0.75] * 9, rel=1e-15)
    step = [0.0] * 6 + [1.0] * 6
    for window in (2, 3, 5, 8):
        smoothed = smooth(step, window)
        assert all(a <= b for a, b in zip(smoothed, smoothed[1:])), window
        assert smoothed[0] == 0.0 and smoothed[-1] == 1.0
    gapped = smooth([1.0, 3.0, math.nan, 10.0, 10.0, 10.0], 3)
    assert gapped[:2] == (2.0, 2.0) and math.isnan(gapped[2]) and gapped[3:] == (10.0, 10.0, 10.0)
    assert smooth([1.0, 5.0, 2.0], 1) == (1.0, 5.0, 2.0)


def test_smoothed_figure_draws_the_raw_values_faintly_behind(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "spo", "spo")
    fig = draw(build_figure(load_runs([run]), "spo", smooth_window=3))
    ax = next(a for a in fig.axes if a.get_title() == "chosen answer: log π/π_ref")
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert list(lines["_raw spo β=0.2 α=1"].get_ydata()) == pytest.approx([1.0, 2.0, 3.0])
    assert list(lines["spo β=0.2 α=1"].get_ydata()) == pytest.approx([1.5, 2.0, 2.5])
    assert lines["_raw spo β=0.2 α=1"].get_alpha() < 1


def test_nan_and_inf_are_drawn_as_gaps_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = _records("spo")
    records[1]["rewards/chosen"] = "nan"  # how the runner writes a non-finite value
    (tmp_path / "spo").mkdir()
    _write_run(tmp_path / "spo", "spo", records)
    with (tmp_path / "spo" / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"step": 40, "loss": Infinity, "rewards/chosen": 0.8}\n')  # Python's json writes bare tokens
    with caplog.at_level(logging.WARNING):
        written = plot_runs([tmp_path / "spo"], tmp_path / "out.png")
    assert written == [tmp_path / "out.png"]
    content = build_figure(load_runs([tmp_path / "spo"]), "spo", every_curve=True)
    panels = {p.title: p for p in content.panels}
    chosen = panels["chosen answer: log π/π_ref"].lines[0]
    assert chosen.steps == (10, 20, 30, 40)  # the NaN point is kept, so the line breaks there
    assert math.isnan(chosen.values[1]) and chosen.values[3] == pytest.approx(4.0)
    assert math.isnan(panels["loss"].lines[0].values[3])
    note = content.notes[-1]
    assert note.startswith("gaps where a run logged NaN/inf:")
    assert "spo β=0.2 α=1 rewards/chosen (step 20)" in note and "spo β=0.2 α=1 loss (step 40)" in note
    drawn = _panels(draw(content))["chosen answer: log π/π_ref"][0][2]
    assert len(drawn) == 4 and math.isnan(drawn[1])
    gap_logs = [r.getMessage() for r in caplog.records if "gaps" in r.getMessage()]
    assert len(gap_logs) == 1 and "rewards/chosen (step 20)" in gap_logs[0]


DAMAGED = b"\n".join([
    b'{"step": 10, "loss": 1.0, "rewards/chosen": 0.2}',
    b'{"step": 20, "loss": null, "rewards/chosen": "abc"}',   # two bad fields, the record's step still counts
    b'{"step": "thirty", "loss": 0.5}',                        # non-numeric step
    b'{"loss": 0.5}',                                          # no step
    b'{"step": 35.5, "loss": 0.5}',                            # not a whole step
    b'{"step": 40, "loss": \xff\xfe}',                         # not UTF-8
    b'[1, 2]',                                                 # not an object
    b'{"step": 50, "loss": 0.25, "rewards/chosen": true, "extra": [1]}',
    b'{"step": 60, "loss": 0.2, "rewards/ch',                  # torn last line of a killed run
])


def test_damaged_records_and_fields_are_skipped_with_one_warning_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = read_metrics_file(_metrics_file(tmp_path, DAMAGED))
    assert metrics.series["loss"].steps == (10, 50) and metrics.series["loss"].values == (1.0, 0.25)
    assert metrics.series["rewards/chosen"].steps == (10,)
    assert [(s.line, s.field) for s in metrics.skipped] == [
        (2, "loss"), (2, "rewards/chosen"), (3, None), (4, None), (5, None), (6, None), (7, None),
        (8, "rewards/chosen"), (8, "extra"), (9, None),
    ]
    warning = metrics.warning()
    assert warning is not None and "\n" not in warning
    assert warning.startswith(f"{tmp_path / 'run' / 'metrics.jsonl'}: skipped 6 record(s) and 4 field(s)")
    assert "line 2 'loss' (null)" in warning and "line 3 (step is text 'thirty')" in warning
    assert warning.endswith("and 5 more")

    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert result.exception is None and (tmp_path / "run" / "metrics.png").is_file()
    skipped_logs = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert skipped_logs == [warning]


def _metrics_file(tmp_path: Path, content: bytes) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "metrics.jsonl").write_bytes(content)
    return folder / "metrics.jsonl"


def test_a_run_with_no_usable_record_is_a_one_line_error(tmp_path: Path) -> None:
    _metrics_file(tmp_path, b'{"step": null, "loss": 1}\n\xff\n{"step": 3, "loss": "x"}\n{"st')
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'run'}: metrics.jsonl holds no usable metric record"
    neither = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert neither.exit_code == 1 and "neither a spo train output folder" in neither.stderr


def test_an_experiment_run_without_records_is_left_out_and_bad_seeds_or_formats_refused(tmp_path: Path) -> None:
    exp = _experiment(tmp_path, seeds=(0,))
    (exp / "seed0" / "ipo" / "metrics.jsonl").write_text("")  # a stage that has just started
    assert [r.label for r in load_runs([exp])] == [LABELS[0], LABELS[2], LABELS[3]]
    missing_seed = CliRunner().invoke(app, ["plot", str(exp), "--seed", "3"])
    assert missing_seed.exit_code == 1 and "has no seed3/; its seeds: 0" in missing_seed.stderr
    no_experiment = CliRunner().invoke(app, ["plot", str(exp / "seed0" / "spo"), "--seed", "0"])
    assert no_experiment.exit_code == 1 and "--seed picks the runs of an experiment folder" in no_experiment.stderr
    bad_format = CliRunner().invoke(app, ["plot", str(exp), "--out", str(tmp_path / "x.pdf")])
    assert bad_format.exit_code == 1 and "written as .png or .svg" in bad_format.stderr


def test_eval_values_are_dashed_in_the_runs_colour(tmp_path: Path) -> None:
    records = _records("dpo")
    records.insert(2, {"step": 20, "eval_loss": 0.9, "eval_rewards/chosen": -0.05, "eval_runtime": 0.1})
    run = _write_run(tmp_path / "dpo", "dpo", records)
    fig = draw(build_figure(load_runs([run]), "dpo"))
    chosen = _panels(fig)["chosen answer: log π/π_ref"]
    assert [(label, x, style) for label, x, _, style in chosen] == [
        ("dpo β=0.1 ε=0.1", list(STEPS), "-"), ("dpo β=0.1 ε=0.1 (eval)", [20], "--"),
    ]
    assert chosen[1][2] == pytest.approx([-0.5])
    assert "evaluation" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert "eval_runtime" not in _panels(fig)


def test_one_run_shows_every_curve_and_rewards_without_a_recipe_stay_as_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _write_run(tmp_path / "spo", "spo")
    titles = [p.title for p in build_figure(load_runs([run]), "spo", every_curve=True).panels]
    assert titles[:3] == ["chosen answer: log π/π_ref", "rejected answer: log π/π_ref", "margin: chosen − rejected log-ratio"]
    assert titles[-3:] == ["learning_rate", "logps/chosen", "logps/rejected"]
    assert plot_runs([run], None, every_curve=True) == [run / "metrics.png"] and (run / "metrics.png").is_file()

    (run / "resolved_recipe.yaml").unlink()
    with caplog.at_level(logging.WARNING):
        runs = load_runs([run])
    assert runs[0].label == "spo" and runs[0].facts.reward_scale is None
    assert any("no resolved_recipe.yaml" in r.getMessage() for r in caplog.records)
    titles = [p.title for p in build_figure(runs, "spo", every_curve=True).panels]
    assert "chosen answer: log π/π_ref" not in titles and "rewards/chosen (as logged)" in titles


def test_spo_experiment_hook_writes_each_seeds_figure_and_survives_a_seed_without_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exp = _experiment(tmp_path, seeds=(0, 1))
    for child in (exp / "seed1").iterdir():
        if child.name not in ("sft", "generations"):
            (child / "metrics.jsonl").unlink()
    with caplog.at_level(logging.WARNING):
        written = write_experiment_curves(exp, [0, 1])
    assert written == [exp / "curves_seed0.png", exp / "curves_seed0.svg"]
    assert any("seed 1: no training-curve figure" in r.getMessage() for r in caplog.records)


def test_plot_modules_import_neither_torch_nor_matplotlib_until_drawing() -> None:
    code = ("import sys, spo_align.plots.compare, spo_align.cli.plot, spo_align.run_folder, spo_align.cli.train; "
            "heavy = {'torch', 'matplotlib', 'transformers'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_runs_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(PlotError, match="does not exist"):
        load_runs([tmp_path / "missing"])


# ---------------------------------------------------------------- single points and many runs


def _dots(line: Any) -> list[int]:
    """Indices of the points a drawn line marks with a dot (none when it has no marker)."""
    if line.get_marker() in (None, "None", "", " "):
        return []
    every = line.get_markevery()
    return list(range(len(line.get_xdata()))) if every is None else list(every)


def test_a_run_with_one_logged_point_draws_it_as_a_dot_in_every_panel(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "spo", "spo", _records("spo")[:1])  # one step record, no summary
    result = CliRunner().invoke(app, ["plot", str(run)])
    assert result.exit_code == 0, result.output
    fig = draw(build_figure(load_runs([run]), "spo", every_curve=True))
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) >= 10
    for ax in titled:
        drawn = [line for line in ax.get_lines() if not line.get_label().startswith("_") and _dots(line)]
        assert drawn, f"panel {ax.get_title()!r} shows nothing"
        assert all(len(line.get_xdata()) == 1 and math.isfinite(line.get_ydata()[0]) for line in drawn)


def test_points_between_gaps_are_dots_and_stretches_stay_lines(tmp_path: Path) -> None:
    records = [{"step": s, "loss": v} for s, v in zip(range(1, 8), (1.0, "nan", 3.0, "nan", "nan", 5.0, 6.0))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = draw(build_figure(load_runs([run]), "run", every_curve=True))
    (line,) = [line for line in next(ax for ax in fig.axes if ax.get_title() == "loss").get_lines()
               if not line.get_label().startswith("_")]
    assert _dots(line) == [0, 2]  # 1.0 and 3.0 stand alone; 5.0-6.0 is a line
    smoothed = draw(build_figure(load_runs([run]), "run", every_curve=True, smooth_window=3))
    (line,) = [line for line in next(ax for ax in smoothed.axes if ax.get_title() == "loss").get_lines()
               if not line.get_label().startswith("_")]
    assert _dots(line) == [0, 2]


def test_more_runs_than_colours_are_told_apart_by_marker_and_said_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from spo_align.plots.compare import COLOURS

    runs = [_write_run(tmp_path / f"r{i:02d}", "spo", None, f"loss.beta={0.1 + i / 100}") for i in range(12)]
    with caplog.at_level(logging.WARNING):
        content = build_figure(load_runs(runs), "many")
    assert len(content.runs) == 12
    styles = list(zip(content.colours, content.markers))
    assert len(set(styles)) == 12  # no two runs look alike
    assert content.markers[: len(COLOURS)] == (None,) * len(COLOURS) and all(content.markers[len(COLOURS):])
    assert any("colours repeat" in note and "marker" in note for note in content.notes)
    fig = draw(content)
    legend = {(h.get_color(), h.get_marker()) for h in fig.legends[0].legend_handles}
    assert len(legend) == 12
    ax = next(a for a in fig.axes if a.get_title() == "chosen answer: log π/π_ref")
    drawn = {(line.get_color(), line.get_marker()) for line in ax.get_lines() if not line.get_label().startswith("_")}
    assert len(drawn) == 12
    assert CliRunner().invoke(app, ["plot", *map(str, runs), "--out", str(tmp_path / "many.png")]).exit_code == 0

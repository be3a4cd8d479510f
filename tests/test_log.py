"""``--log FILE``: version, command line, resolved configuration, progress, timings, outputs."""

import json

from mgaussian import __version__
from mgaussian.cli import main


def test_reconstruct_log(small_case, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"iterations": [0, 2], "cg_iterations": 2}))
    out = tmp_path / "v.nii.gz"
    log = tmp_path / "run.log"
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *small_case["stacks"],
            "--stack-masks",
            *small_case["masks"],
            "--output-volume",
            str(out),
            "--config",
            str(cfg),
            "--output-resolution",
            "3",
            "--quiet",
            "--log",
            str(log),
        ]
    )
    capsys.readouterr()
    assert rc == 0 and out.exists()
    text = log.read_text()
    assert f"mgaussian {__version__}" in text
    assert "command: " in text and "reconstruct" in text and "--log" in text
    assert '"spacing_factors"' in text
    line = next(ln for ln in text.splitlines() if "config: " in ln)
    assert json.loads(line.split("config: ", 1)[1])["cg_iterations"] == 2
    assert "timings_s: " in text and "total_s" in text
    assert "Gaussians" in text  # the run's own log lines (even under --quiet)
    assert str(out) in text


def test_log_is_refused_over_an_input(small_case, tmp_path, capsys):
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *small_case["stacks"],
            "--output-volume",
            str(tmp_path / "v.nii.gz"),
            "--log",
            small_case["stacks"][1],
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --log:")

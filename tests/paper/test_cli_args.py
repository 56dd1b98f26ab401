"""The command line refuses bad values while parsing: one line on stderr, exit 2, no
traceback, before any data is loaded or model built."""
import pytest

import worm
import worm.paper.text
from worm.paper import cli


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("cmd", ["compare", "sweep-r"])
@pytest.mark.parametrize("flag, value, says", [
    ("--window", "0", "--window: 0 is outside [2, inf)"), ("--window", "1", "outside [2"),
    ("--window", "2.5", "not an integer"), ("--prune-ratio", "1", "outside [0, 1)"),
    ("--prune-ratio", "-0.1", "outside"), ("--stop", "0", "outside (0"), ("--stop", "inf", "finite"),
    ("--delta", "-1", "outside [0"), ("--r", "nan", "finite"), ("--r", "-0.5", "outside [0"),
    ("--lr", "0", "outside (0"), ("--momentum", "-0.9", "outside"), ("--batch-size", "0", "outside [1"),
    ("--max-epochs", "0", "outside [1"), ("--retrain-epochs", "-1", "outside [0"),
    ("--threads", "0", "outside [1"), ("--width", "0", "outside (0"), ("--seeds", "x", "not an integer"),
    ("--train-subset", "0", "outside [1"), ("--test-subset", "-3", "outside"),
])
def test_bad_values_are_refused_while_parsing(cmd, flag, value, says, capsys):
    line = _refused(capsys, [cmd, flag, value, "--quiet"])
    assert line.startswith(f"worm {cmd}: error: argument {flag}") and says in line, line


def test_zero_is_a_value_not_a_missing_flag():
    a = cli._parser().parse_args(["compare", "--retrain-epochs", "0", "--window", "2"])
    cfg = cli._cnn_config(a)
    assert cfg.retrain_epochs == 0 and cfg.window == 2


def test_sweep_r_values_are_checked(capsys):
    assert "--rs: -0.5 is outside" in _refused(capsys, ["sweep-r", "--rs", "1", "-0.5"])


@pytest.mark.parametrize("argv, says", [
    (["--csv", "x.csv"], "--csv goes only with --task csv"),
    (["--task", "minilm-rt", "--text-col", "t"], "--text-col goes only with --task csv"),
    (["--test-share", "0.3"], "--test-share goes only with --task csv"),
    (["--task", "csv"], "--task csv needs --csv PATH"),
    (["--n-test", "5"], "--n-test goes only with --task"),
    (["--task", "csv", "--csv", "/no/such.csv"], "no CSV file at /no/such.csv"),
    (["--task", "csv", "--csv", "x", "--test-share", "1"], "--test-share: 1 is outside (0, 1)"),
    (["--task", "minilm-rt", "--every", "-1"], "--every: -1 is outside [0"),
])
def test_text_flag_combinations(argv, says, capsys):
    line = _refused(capsys, ["compare", *argv, "--quiet"])
    assert says in line, line


def _small_csv(tmp_path, n=30):
    p = tmp_path / "small.csv"
    p.write_text("review,stars\n" + "".join(f"snippet {i},{'pos' if i % 2 else 'neg'}\n" for i in range(n)))
    return p


def test_small_csv_gets_splits_that_fit(tmp_path, monkeypatch):
    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return {"kind": "compare", "config": {}, "runs": []}
    import worm.paper.experiments_text as et
    monkeypatch.setattr(et, "run_text_compare", fake_run)
    monkeypatch.setattr(cli, "_write", lambda *a, **k: None)
    p = _small_csv(tmp_path)
    base = ["compare", "--task", "csv", "--csv", str(p), "--text-col", "review", "--label-col", "stars",
            "--quiet", "--out", str(tmp_path / "o")]
    assert cli.main(base) == 0
    # 20% of 30 rows held out (--test-share), both splits whole: the 256 defaults shrink
    assert (seen["n_train"], seen["n_test"], seen["test_share"]) == (24, 6, 0.2)
    assert (seen["text_col"], seen["label_col"]) == ("review", "stars")
    assert cli.main(base + ["--test-share", "0.5", "--n-train", "10"]) == 0
    assert (seen["n_train"], seen["n_test"], seen["test_share"]) == (10, 15, 0.5)
    train, test = worm.paper.text.load_csv(p, "review", "stars", n_train=10, n_test=15, test_share=0.5)
    assert len(train) == 10 and len(test) == 15


def test_too_big_a_split_names_the_flags(tmp_path, capsys):
    p = _small_csv(tmp_path)
    line = _refused(capsys, ["compare", "--task", "csv", "--csv", str(p), "--text-col", "review",
                             "--label-col", "stars", "--n-test", "7", "--quiet"])
    assert "--n-test 7 does not fit" in line and "holds 6 rows" in line and "--test-share 0.2" in line
    line = _refused(capsys, ["compare", "--task", "csv", "--csv", str(p), "--quiet"])
    assert "no column 'text'" in line


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"worm {worm.__version__}"


# ------------------------------------------------------------------ issue 17: the CLI's own errors
def test_sweep_r_refuses_r_above_one_while_parsing(capsys):
    line = _refused(capsys, ["sweep-r", "--rs", "2", "--quiet"])
    assert line.startswith("worm sweep-r: error: argument --rs: 2 is outside [0, 1]"), line


def test_rs_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sweep-r", "--help"])
    out = capsys.readouterr().out
    assert "--rs R [R ...]" in out and "truncation factors r in [0, 1]" in out


def test_missing_dataset_is_a_usage_error_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORM_CIFAR10_DIR", raising=False)
    line = _refused(capsys, ["compare", "--dataset", "cifar10", "--quiet", "--out", str(tmp_path / "o")])
    assert line.startswith("worm compare: error: --dataset cifar10: CIFAR-10 location not given")
    assert "--data-root ROOT" in line
    assert not (tmp_path / "o").exists()
    line = _refused(capsys, ["sweep-r", "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
                             "--quiet"])
    assert line.startswith("worm sweep-r: error: --dataset fashion-mnist: Fashion-MNIST not found")


@pytest.mark.parametrize("argv, cmd", [
    (["compare", "--bogus"], "compare"), (["sweep-r", "--task", "minilm-rt"], "sweep-r"),
    (["sweep-r", "--no-controls"], "sweep-r"),
])
def test_usage_errors_name_the_subcommand(argv, cmd, capsys):
    line = _refused(capsys, argv)
    assert line.startswith(f"worm {cmd}: error: unrecognized arguments:") and f"see worm {cmd} --help" in line


def test_prune_and_controls_flags(capsys):
    a = cli._parser().parse_args(["compare", "--prune", "weights", "--no-controls", "--recal-batches", "0"])
    cfg = cli._cnn_config(a)
    assert (cfg.prune, cfg.controls, cfg.recal_batches) == ("weights", False, 0)
    cfg = cli._cnn_config(cli._parser().parse_args(["compare"]))
    assert (cfg.prune, cfg.controls, cfg.recal_batches) == ("channels", True, 20)
    assert "argument --prune: invalid choice" in _refused(capsys, ["compare", "--prune", "filters"])
    assert "--prune applies to CNN runs" in _refused(capsys, ["compare", "--task", "minilm-rt",
                                                               "--prune", "weights"])


def test_stop_auto_takes_delta_auto():
    a = cli._parser().parse_args(["compare", "--stop", "auto"])
    cfg = cli._cnn_config(a)
    assert (cfg.stop, cfg.delta) == ("auto", "auto")
    a = cli._parser().parse_args(["compare", "--delta", "auto"])
    assert (cli._cnn_config(a).stop, cli._cnn_config(a).delta) == (0.1, "auto")


@pytest.mark.parametrize("argv, says", [
    (["--stop", "auto", "--delta", "0.05"], "--stop auto has no s: use --delta auto"),
    (["--stop", "1.5"], "--stop: 1.5 is outside (0, 1]"),
    (["--stop", "Auto"], "is not a number"),
    (["--delta", "automatic"], "is not a number"),
])
def test_stop_and_delta_auto_refusals(argv, says, capsys):
    line = _refused(capsys, ["compare", *argv, "--quiet"])
    assert says in line, line

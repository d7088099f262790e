"""Training the router and evaluating it across datasets: determinism, the plain-Python scorer's parity, the
false-SoT threshold rule, Wilson intervals, the cross-dataset report, and (slow) retraining the shipped
model from the shipped data reproduces its decisions on Vicuna-80."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from sot.cli.router_cmd import router as router_cli
from sot.errors import ConfigError
from sot.router.base import RouterInput, router_input
from sot.router.crosseval import CrossRun, cross_evaluate, targets_met
from sot.router.data import load_examples, own_data_dir
from sot.router.embeddings import EmbeddingSpec
from sot.router.metrics import wilson_interval
from sot.router.trained import TrainedRouter, load_model

sklearn = pytest.importorskip("sklearn")
np = pytest.importorskip("numpy")

from sot.router.training import Recipe, false_sot_threshold, train_model  # noqa: E402

SHARED = Path(__file__).parents[1].parent / "shared"
LIMA = SHARED / "data" / "lima_router.jsonl"
VICUNA = SHARED / "data" / "vicuna80.jsonl"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present")
PINNED_SKLEARN = "1.9.1"  # the `train` extra's pin
QUICK = Recipe(folds=3, repeats=1, c_values=(3.0,), embed_scales=(0.02,))


def fake_embed(view: RouterInput) -> list[float]:
    """A deterministic stand-in for the embedded model: 8 hashed bag-of-words counts."""
    out = [0.0] * 8
    for word in (view.request + " " + view.context_text()).lower().split():
        out[int(hashlib.md5(word.encode()).hexdigest(), 16) % 8] += 1.0
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every third packaged example (all kinds, some conversations), as one JSONL file."""
    lines = []
    for file in sorted(own_data_dir().glob("*.jsonl")):
        lines += file.read_text(encoding="utf-8").splitlines()
    path = tmp_path_factory.mktemp("data") / "small.jsonl"
    path.write_text("\n".join(lines[::3]) + "\n", encoding="utf-8")
    return path


def test_training_is_deterministic_and_scores_in_plain_python(small_data: Path) -> None:
    spec = EmbeddingSpec()
    first = train_model([small_data], recipe=QUICK, spec=spec, embed=fake_embed)
    second = train_model([small_data], recipe=QUICK, spec=spec, embed=fake_embed)
    assert first.to_json() == second.to_json()
    assert first.combined is not None and len(first.combined.embed) == 8 and first.embedding == spec
    training = first.training
    assert training["examples"] == len(load_examples(small_data)) and training["datasets"][0]["name"] == "small.jsonl"
    assert training["scikit_learn"] == sklearn.__version__ and training["recipe"]["folds"] == 3
    for head in ("words", "combined"):
        assert training[head]["cv_at_threshold"]["false_sot_rate"] <= QUICK.target_false_sot
    # Stored check scores are scikit-learn's; the plain-Python router reproduces them.
    router = TrainedRouter(first, embedder=type("E", (), {"embed": staticmethod(fake_embed)})())
    for check in first.checks:
        decision = router.decide_view(router_input([_user(check.text)]))
        assert check.combined is not None and decision.score == pytest.approx(check.combined, abs=1e-4)


def test_word_only_training_through_the_cli(small_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    result = CliRunner().invoke(router_cli, ["train", str(small_data), "--words-only", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    model = load_model(out)
    assert model.combined is None and summary["bytes"] == out.stat().st_size
    assert summary["recipe"]["seed"] == 0 and summary["words"]["threshold_rule_met"]
    table = CliRunner().invoke(router_cli, ["train", str(small_data), "--words-only", "-o", str(out)])
    assert table.exit_code == 0 and "Cross-validated" in table.output and "words" in table.output


def test_training_needs_both_labels(tmp_path: Path) -> None:
    data = tmp_path / "few.jsonl"
    data.write_text('{"question": "What is love?", "label": true}\n' * 20, encoding="utf-8")
    with pytest.raises(ConfigError, match="of each label"):
        train_model([data], spec=None)


def test_the_threshold_is_the_lowest_meeting_the_false_sot_target() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1])
    run = np.array([0.2, 0.45, 0.55, 0.65, 0.6, 0.9])
    # Negatives score 0.2, 0.45, 0.55, 0.65: at most 1 of 4 (25%) is reached from 0.56 on.
    assert false_sot_threshold([run], labels, 0.25) == (0.56, True)
    assert false_sot_threshold([run], labels, 0.0) == (0.66, True)
    assert false_sot_threshold([np.ones(6)], labels, 0.1) == (0.9, False)


def test_wilson_intervals_by_hand() -> None:
    low, high = wilson_interval(0, 10) or (None, None)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(40, 80) or (0, 0)
    assert low == pytest.approx(1 - high)


def test_cross_runs_report_intervals_baselines_and_targets() -> None:
    labels = (True,) * 37 + (False,) * 43
    categories = ("generic",) * 37 + ("coding",) * 20 + ("writing",) * 23
    scores = (0.9,) * 32 + (0.1,) * 5 + (0.6,) * 1 + (0.1,) * 42
    run = CrossRun(("LIMA", "own"), "Vicuna-80", "combined", 0.5, labels, scores, categories)
    s = run.summary()
    assert s["accuracy"] == pytest.approx(74 / 80) and s["majority_baseline"] == pytest.approx(43 / 80)
    assert s["accuracy_ci95"][0] < s["accuracy"] < s["accuracy_ci95"][1]
    assert s["false_sot"] == [1, 43] and s["no_sot_categories"] == {"categories": ["coding"], "sent_to_sot": 1, "n": 20}
    assert s["targets"] == {"accuracy>=85%": True, "false_sot<=10%": True, "coding+math+fermi<=1/20": True}
    assert targets_met({**s, "accuracy": 0.84})["accuracy>=85%"] is False


def test_cross_evaluate_trains_on_one_source_and_tests_on_another(small_data: Path) -> None:
    examples = load_examples(small_data)
    half = len(examples) // 2
    sources = {"A": examples[:half], "B": examples[half:]}
    runs = cross_evaluate(sources, [(("A",), "B"), (("B",), "A"), (("C",), "A")], recipe=QUICK, embed=fake_embed)
    assert [(r.train, r.test, r.head) for r in runs] == [
        (("A",), "B", "combined"),
        (("A",), "B", "words"),
        (("B",), "A", "combined"),
        (("B",), "A", "words"),
    ]
    assert all(len(r.scores) == len(sources[r.test]) for r in runs)
    assert all(r.summary()["targets"] is None for r in runs)  # not Vicuna-80


def _user(text: str) -> object:
    from sot.backends.base import Message

    return Message(role="user", content=text)


# -- the shipped model (slow: embeds LIMA and the packaged data, ~1 min) -------------------------------


@needs_shared
@pytest.mark.slow
def test_retraining_from_the_shipped_data_reproduces_the_shipped_decisions_on_vicuna80() -> None:
    if sklearn.__version__ != PINNED_SKLEARN:
        pytest.skip(f"the shipped model was trained with scikit-learn {PINNED_SKLEARN} (the train extra's pin)")
    shipped = load_model()
    assert shipped.training["scikit_learn"] == PINNED_SKLEARN
    retrained = train_model([LIMA, own_data_dir()], recipe=Recipe(), spec=EmbeddingSpec())
    questions = load_examples(VICUNA)
    old, new = TrainedRouter(shipped), TrainedRouter(retrained)
    worst = 0.0
    for example in questions:
        view = router_input(list(example.messages))
        a, b = old.decide_view(view), new.decide_view(view)
        assert a.use_sot == b.use_sot, example.id
        assert a.score is not None and b.score is not None
        worst = max(worst, abs(a.score - b.score))
    assert worst <= 1e-4  # the stated tolerance: scores are stored to 6 significant digits
    assert old.fallback_reason is None and new.fallback_reason is None
    assert retrained.training["data_sha256"] == shipped.training["data_sha256"]


@needs_shared
@pytest.mark.slow
def test_cli_cross_evaluation_reports_every_pair() -> None:
    result = CliRunner().invoke(router_cli, ["eval", "--cross", "--words-only", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    pairs = [(r["train"], r["test"]) for r in runs]
    assert pairs == [
        ("LIMA", "Vicuna-80"),
        ("own", "Vicuna-80"),
        ("LIMA+own", "Vicuna-80"),
        ("LIMA", "own"),
        ("own", "LIMA"),
    ]
    for r in runs:
        assert r["head"] == "words" and r["majority_baseline"] is not None and r["accuracy_ci95"] is not None
        assert (r["targets"] is not None) == (r["test"] == "Vicuna-80")


def test_cli_cross_evaluation_table(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sot.cli.router_cmd as router_cmd

    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "Tips?", "label": true}\n', encoding="utf-8")
    labels = (True,) * 37 + (False,) * 43
    run = CrossRun(("LIMA", "own"), "Vicuna-80", "combined", 0.5, labels, (0.9,) * 80, ("coding",) * 80)
    monkeypatch.setattr(router_cmd, "cross_evaluate", lambda sources, **kwargs: [run])
    args = ["eval", "--cross", "--lima", str(data), "--vicuna", str(data), "--own", str(data)]
    table = CliRunner().invoke(router_cli, args, env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "LIMA+own -> Vicuna-80" in table.output and "majority" in table.output and "53.8%" in table.output
    assert "missed" in table.output and "all met" not in table.output

"""`relufy evaluate` / `relufy compare` on a tiny ReLU checkpoint with tiny slices of the offline tasks."""

import json

import pytest
from tiny_models import save_tiny_model

from relufy.cli import main
from relufy.errors import DataError, OutputExistsError, SourceError
from relufy.evaluate import EvalConfig, evaluate_model

QUICK = dict(limit=6, ps=(1, 5), heldout_tokens=256, block_size=32)
NO_PPL = dict(limit=6, ps=())


@pytest.fixture(scope="module")
def evaluation(relu_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny-relu-eval"
    assert main(["evaluate", str(relu_checkpoint), "--output", str(out), "--limit", "6", "--batch-size", "4",
                 "--p", "1,5", "--heldout-tokens", "256", "--block-size", "32", "--log-samples"]) == 0
    return out


def test_evaluate_writes_results_report_and_plots(evaluation, relu_checkpoint):
    results = json.loads((evaluation / "results.json").read_text())
    for key in ("lm_eval", "sparsity", "ppl_p_sparsity", "model", "relufy_version", "tokens_evaluated"):
        assert key in results
    assert results["model"] == "tiny-relu"  # a name, not the local path: results are meant for sharing
    assert str(relu_checkpoint.parent) not in (evaluation / "results.json").read_text()
    assert results["heldout"]["source"] == "evaluate/tasks/data/heldout.jsonl"
    assert set(results["identity"]) == {"config_sha256", "weights_sha256", "weights_hashed", "activation"}
    assert set(results["lm_eval"]["results"]) == {"relufy_heldout", "relufy_lastword", "relufy_dictionary"}
    assert results["lm_eval"]["n-samples"]["relufy_dictionary"]["effective"] == 6
    assert set(results["sparsity"]["per_task"]) == set(results["lm_eval"]["results"])
    assert len(results["sparsity"]["per_layer"]) == 2
    assert 0.2 < results["sparsity"]["overall"] < 0.8  # a random-init ReLU model zeroes about half of x1
    assert set(results["ppl_p_sparsity"]) == {"1", "5"}
    for entry in results["ppl_p_sparsity"].values():
        assert {"sparsity", "ppl", "ppl_dense", "cett", "thresholds"} <= set(entry)
        assert len(entry["thresholds"]) == 2
        assert entry["sparsity"] >= results["sparsity"]["overall"] - 0.1  # exact zeros always count as inactive
    assert results["tokens_evaluated"] == results["sparsity"]["tokens"] + results["heldout"]["tokens"]
    assert "offline" in results["scores"]
    report = (evaluation / "report.md").read_text()
    assert "relufy_dictionary" in report and "PPL-p% sparsity" in report
    for png in ("sparsity_per_layer.png", "sparsity_vs_p.png"):
        assert (evaluation / png).read_bytes()[:4] == b"\x89PNG"


def test_log_samples_writes_each_scored_example_in_agreement_with_the_aggregate(evaluation):
    results = json.loads((evaluation / "results.json").read_text())["lm_eval"]["results"]
    samples = {task: [json.loads(line) for line in (evaluation / f"samples_{task}.jsonl").read_text().splitlines()]
               for task in ("relufy_heldout", "relufy_lastword", "relufy_dictionary")}
    for records in samples.values():
        assert len(records) == 6 and all("doc" in r and "resps" in r for r in records)
    dictionary = samples["relufy_dictionary"]
    accuracy = sum(r["acc_norm"] for r in dictionary) / len(dictionary)
    assert accuracy == pytest.approx(results["relufy_dictionary"]["acc_norm,none"])


def test_scores_carry_lm_evals_standard_error_of_the_examples_scored(evaluation):
    from lm_eval.api.metrics import mean_stderr

    results = json.loads((evaluation / "results.json").read_text())
    errors = {}
    for task in ("relufy_lastword", "relufy_dictionary"):
        records = [json.loads(line) for line in (evaluation / f"samples_{task}.jsonl").read_text().splitlines()]
        metric = "acc_norm" if task == "relufy_dictionary" else "acc"
        errors[task] = mean_stderr([float(r[metric]) for r in records]) * 100  # lm-eval's own closed form
    assert results["scores_stderr"]["offline"] == pytest.approx((errors["relufy_lastword"] ** 2
                                                                 + errors["relufy_dictionary"] ** 2) ** 0.5 / 2)
    assert results["scores_stderr"]["average"] == pytest.approx(results["scores_stderr"]["offline"])
    report = (evaluation / "report.md").read_text()
    assert f"| offline | {results['scores']['offline']:.2f} ± {results['scores_stderr']['offline']:.2f} |" in report


def test_padding_is_not_counted_as_tokens(relu_checkpoint, tmp_path):
    one = evaluate_model(str(relu_checkpoint), tmp_path / "b1",
                         EvalConfig(tasks=["relufy_dictionary"], batch_size=1, **NO_PPL))
    four = evaluate_model(str(relu_checkpoint), tmp_path / "b4",
                          EvalConfig(tasks=["relufy_dictionary"], batch_size=4, **NO_PPL))
    assert one["sparsity"]["per_task"]["relufy_dictionary"]["tokens"] == \
        four["sparsity"]["per_task"]["relufy_dictionary"]["tokens"]
    assert one["sparsity"]["overall"] == pytest.approx(four["sparsity"]["overall"], abs=1e-6)


def test_compare_shows_evaluations_side_by_side(evaluation, tmp_path, capsys):
    markdown = tmp_path / "compare.md"
    assert main(["compare", str(evaluation), str(evaluation / "results.json"), "--markdown", str(markdown)]) == 0
    printed = capsys.readouterr().out
    table, _, signature = markdown.read_text().strip().rpartition("\n\n")
    assert table == printed.strip() and signature.startswith("<!-- relufy_output: ")  # invisible when rendered
    assert "relufy_dictionary (acc" in printed and "PPL-1% sparsity" in printed and "zero-ratio" in printed
    assert printed.splitlines()[0].count("tiny-relu-eval") == 2


def test_unknown_task_lists_close_matches(relu_checkpoint, tmp_path):
    with pytest.raises(DataError, match="did you mean: relufy_dictionary"):
        evaluate_model(str(relu_checkpoint), tmp_path / "x", EvalConfig(tasks=["relufy_dictionery"]))
    assert not (tmp_path / "x").exists()


def test_model_without_tokenizer_is_refused(tmp_path):
    bare = save_tiny_model("llama", tmp_path / "bare")
    with pytest.raises(SourceError, match="tokenizer"):
        evaluate_model(str(bare), tmp_path / "out", EvalConfig(tasks=["relufy_dictionary"], **NO_PPL))


def test_empty_heldout_text_and_non_positive_p_are_refused(relu_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        evaluate_model(str(relu_checkpoint), tmp_path / "o1", EvalConfig(tasks=["relufy_dictionary"], heldout=empty,
                                                                          block_size=32, heldout_tokens=256))
    with pytest.raises(DataError, match=r"--p \(a perplexity rise in percent\) must be a finite number in \(0, "):
        evaluate_model(str(relu_checkpoint), tmp_path / "o2", EvalConfig(tasks=["relufy_dictionary"], ps=(1, 0)))


def test_existing_output_needs_force(evaluation, relu_checkpoint):
    with pytest.raises(OutputExistsError, match="--force"):
        evaluate_model(str(relu_checkpoint), evaluation, EvalConfig(tasks=["relufy_dictionary"], **NO_PPL))
    assert (evaluation / "results.json").is_file()


def test_cli_reports_bad_input_in_one_line(relu_checkpoint, tmp_path, capsys):
    assert main(["evaluate", str(relu_checkpoint), "-o", str(tmp_path / "o"), "--tasks", "piqaa"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("relufy evaluate: error: unknown lm-eval task 'piqaa'") and "\n" not in err
    assert main(["compare", str(tmp_path / "missing")]) != 0


@pytest.mark.parametrize("limit", ["-5", "0"])
def test_a_limit_that_is_not_positive_is_one_line(relu_checkpoint, tmp_path, capsys, limit):
    assert main(["evaluate", str(relu_checkpoint), "-o", str(tmp_path / "o"), "--limit", limit]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relufy evaluate: error: --limit must be a finite number in (0, ") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_evaluation_settings_are_checked_when_the_config_is_made():
    with pytest.raises(DataError, match=r"--heldout-tokens \(64\) must be at least --block-size \(256\)"):
        EvalConfig(heldout_tokens=64)
    with pytest.raises(DataError, match="--batch-size must be an integer from 1 to 65536, got 0"):
        EvalConfig(batch_size=0)
    assert EvalConfig(ps=[1, "5"]).ps == (1.0, 5.0)


def test_lm_eval_itself_runs_the_offline_suite_as_relufy_does(evaluation, relu_checkpoint):
    """`lm_eval --include_path evaluate/tasks --tasks relufy_offline` gives relufy's numbers (the probe changes none)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from relufy.suites import tasks_dir

    relufy = json.loads((evaluation / "results.json").read_text())["lm_eval"]
    lm = HFLM(pretrained=str(relu_checkpoint), batch_size=4, device="cpu")
    out = simple_evaluate(model=lm, tasks=["relufy_offline"], limit=6, bootstrap_iters=0,
                          task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
    assert out["group_subtasks"]["relufy_offline"] == list(relufy["results"])
    for task, metrics in relufy["results"].items():
        assert out["n-shot"][task] == relufy["n-shot"][task]
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert out["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_a_successful_evaluation_prints_no_alarming_noise(relu_checkpoint, tmp_path, monkeypatch, capfd, caplog):
    monkeypatch.chdir(tmp_path)  # outside any git checkout
    evaluate_model(str(relu_checkpoint), tmp_path / "o", EvalConfig(tasks=["relufy_dictionary"], **NO_PPL))
    out, err = capfd.readouterr()
    assert "not a git repository" not in out + err
    assert "not of type `str`" not in out + err + caplog.text


def test_every_long_phase_shows_a_labelled_progress_bar(relu_checkpoint, tmp_path, capfd):
    evaluate_model(str(relu_checkpoint), tmp_path / "o", EvalConfig(tasks=["relufy_dictionary"], limit=2, ps=(1, 5),
                                                                heldout_tokens=64, block_size=32))
    err = capfd.readouterr().err
    for label in ("lm-eval task relufy_dictionary", "PPL-1% sparsity search", "PPL-5% sparsity search"):
        assert label in err


def test_prosparse_suite_maps_the_paper_groups_to_real_lm_eval_tasks():
    from relufy.suites import make_plan, task_manager

    plan = make_plan(None, "prosparse")
    assert set(plan.groups) == {"code", "commonsense", "reading", "gsm8k", "mmlu", "bbh", "agieval"}
    assert plan.tasks["gsm8k"] == 8 and plan.tasks["mmlu"] == 5 and plan.tasks["piqa"] == 0
    task_manager(list(plan.tasks))  # raises DataError if lm-eval does not know one of them


def test_group_averages_follow_the_paper_average_of_groups():
    from relufy.scores import group_averages

    harness = {"results": {"piqa": {"acc,none": 0.7, "acc_norm,none": 0.8}, "copa": {"acc,none": 0.6},
                           "gsm8k": {"exact_match,strict-match": 0.1}}}
    scores = group_averages(harness, {"commonsense": ["piqa", "copa"], "gsm8k": ["gsm8k"], "code": ["mbpp"]})
    assert scores["commonsense"] == pytest.approx(70.0)  # acc_norm for piqa (80), acc for copa (60)
    assert scores["gsm8k"] == pytest.approx(10.0)
    assert "code" not in scores and scores["average"] == pytest.approx(40.0)


def test_standard_errors_are_known_for_proportions_and_combine_over_independent_tasks():
    from relufy.report import compare_table
    from relufy.scores import group_stderrs, score_stderr

    harness = {"results": {"piqa": {"acc,none": 0.7, "acc_stderr,none": "N/A"}, "copa": {"acc,none": 0.6},
                           "squad": {"f1,none": 0.5}, "boolq": {"acc,none": 0.5, "acc_stderr,none": 0.02},
                           "wiki": {"word_perplexity,none": 30.0}},
               "n-samples": {"piqa": {"effective": 101}, "copa": {"effective": 51}, "squad": {"effective": 80},
                             "wiki": {"effective": 10}}}
    assert score_stderr(harness, "piqa") == pytest.approx((0.7 * 0.3 / 100) ** 0.5 * 100)
    assert score_stderr(harness, "boolq") == pytest.approx(2.0)  # lm-eval's own, where it recorded one
    assert score_stderr(harness, "squad") is None  # f1 is not 0 or 1 per example: no closed form
    assert score_stderr(harness, "wiki") is None and score_stderr(harness, "absent") is None
    errors = group_stderrs(harness, {"commonsense": ["piqa", "copa", "wiki"], "reading": ["boolq"]})
    piqa, copa = score_stderr(harness, "piqa"), score_stderr(harness, "copa")
    assert errors["commonsense"] == pytest.approx((piqa ** 2 + copa ** 2) ** 0.5 / 2)  # the perplexity task is no score
    assert errors["average"] == pytest.approx((errors["commonsense"] ** 2 + 4.0) ** 0.5 / 2)
    unknown = group_stderrs(harness, {"commonsense": ["piqa"], "reading": ["squad"]})
    assert set(unknown) == {"commonsense"}  # no error for a group with an unknown one, nor for the average
    result = {"lm_eval": harness, "scores": {"commonsense": 65.0}, "settings": {"groups": {"commonsense": ["piqa"]}},
              "sparsity": {"overall": 0.5}}
    table = compare_table([result], ["m"])
    assert f"| piqa (acc) | 70.00 ± {piqa:.2f} |" in table and f"| group: commonsense | 65.00 ± {piqa:.2f} |" in table

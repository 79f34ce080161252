"""The FATReLU threshold calibration after training (relufy.threshold)."""

from tiny_models import batch, relu_model

from relufy.threshold import ThresholdSearch, calibrate_threshold

def test_calibration_takes_the_largest_threshold_within_the_bound(monkeypatch):
    """With perplexity 100 * (1 + t), a 1% bound allows t <= 0.01: the search must land just below it."""
    from relufy import metrics
    from relufy.activations import module_class

    def fake_measure(model, blocks, **kwargs):
        shifted = [m.threshold for m in model.modules() if isinstance(m, module_class("fatrelu"))]
        t = shifted[0] if shifted else 0.0
        return {"perplexity": 100 * (1 + t), "overall": 0.5 + t, "tokens": 64}

    monkeypatch.setattr(metrics, "measure_sparsity", fake_measure)
    tight = calibrate_threshold(relu_model().eval(), [], ThresholdSearch(0.01, 0.05, steps=8, max_tokens=64))
    assert 0.009 <= tight["threshold"] <= 0.01
    assert tight["perplexity_after"] <= 101.0 and tight["sparsity_after"] > tight["sparsity_before"]
    assert all(t["threshold"] <= 0.05 for t in tight["tried"])
    loose = calibrate_threshold(relu_model().eval(), [], ThresholdSearch(0.1, 0.05, steps=8, max_tokens=64))
    assert loose["threshold"] == 0.05
    none = calibrate_threshold(relu_model().eval(), [], ThresholdSearch(0.0, 0.05, steps=4, max_tokens=64))
    assert none["threshold"] == 0.0 and none["perplexity_after"] == 100.0


def test_calibration_on_a_real_model_respects_the_bound():
    model = relu_model().eval()
    blocks = {"input_ids": [batch(seed)["input_ids"][0].tolist() for seed in range(4)]}

    class Blocks(list):
        def __getitem__(self, item):
            return {"input_ids": blocks["input_ids"][item]} if isinstance(item, slice) else super().__getitem__(item)

    rows = Blocks([{"input_ids": ids} for ids in blocks["input_ids"]])
    result = calibrate_threshold(model, rows, ThresholdSearch(0.001, 0.5, steps=3, max_tokens=64))
    assert result["perplexity_after"] <= result["perplexity_before"] * 1.001
    assert result["sparsity_after"] >= result["sparsity_before"]

"""Handing free heap pages back to the OS between pruning calls."""
import pytest
import torch

from efx import heap
from efx.measure import rss_bytes


@pytest.mark.skipif(heap.libc() is None, reason="needs glibc")
def test_release_returns_freed_heap_pages_that_a_live_chunk_above_them_pins():
    chunks = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KiB each, 256 MiB in glibc's heap
    pin = torch.ones(16 * 1024)  # allocated above them: glibc cannot shrink the heap's top past it
    del chunks
    before = rss_bytes()
    assert heap.release_free_memory()
    released = before - rss_bytes()
    assert released > 128 * 2**20, f"only {released / 2**20:.0f} MiB returned"
    assert float(pin.sum()) == 16 * 1024


def test_callback_releases_after_every_call_unless_told_not_to(monkeypatch):
    from conftest import char_tokenizer, tiny_model
    import efx.callback as callback_module
    from efx.callback import EfficientXpertCallback
    from efx.pipelines import calibration_batches
    from efx.prune import PruneConfig
    from efx.training import TrainSettings, train_lora

    examples = [{"prompt": f"say {w}", "completion": w} for w in ("alpha", "beta", "gamma", "delta")] * 4
    tok = char_tokenizer()
    settings = TrainSettings(epochs=2, n_examples=0, batch_size=8, learning_rate=1e-2)
    real_prune = callback_module.prune
    for release in (True, False):
        events = []
        callback = EfficientXpertCallback(calibration_batches(tok, examples, n=8), PruneConfig(sparsity=0.5),
                                          release_memory=release)
        monkeypatch.setattr(callback_module, "prune", lambda *a, **k: events.append("prune") or real_prune(*a, **k))
        monkeypatch.setattr(heap, "release_free_memory", lambda: events.append("release") or True)
        train_lora(tiny_model("llama", vocab_size=256), tok, examples, training=settings, callbacks=[callback])
        # two calls (epoch 2 start, train end), each followed by a release when asked
        assert events == (["prune", "release"] * 2 if release else ["prune"] * 2)
        assert all(("release_seconds" in r) == release for r in callback.reports)

"""Prompt tuning (deltakern.train, `deltakern train`): the learner against open_clip's own
encode_text, frozen weights, training, checkpoints and resume, export, and a 2-process run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import deltakern as dk
from deltakern import prompt as tr
from deltakern.clip.models import TINY_MODEL, load_model

CLASSES = {"red_apple": (220, 30, 30), "green_leaf": (30, 200, 40), "blue_sky": (30, 40, 220)}
IMAGES_PER_CLASS = 6


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    """Three separable classes: solid colours plus pixel noise, odd image sizes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / name).mkdir()
        for i in range(IMAGES_PER_CLASS):
            h, w = (int(v) for v in rng.integers(33, 45, size=2))
            pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "green_leaf" / "notes.txt").write_text("not an image\n")
    return str(root)


def _tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(TINY_MODEL, "none", seed=0)


def _config(image_folder: str, **overrides) -> tr.TrainConfig:
    # float32 throughout: the runs compared below must round alike, and "auto" is bf16 autocast on
    # CPUs with native bf16 (`--precision` in the README).
    base = dict(
        model=TINY_MODEL, pretrained="none", train_dir=image_folder, shots=4, epochs=3, batch_size=4,
        workers=0, lr=0.05, cache_image_features=True, seed=3, precision="fp32",
    )
    base.update(overrides)
    return tr.TrainConfig(**base)


def _train(config: tr.TrainConfig, **kwargs) -> tr.TrainResult:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.train(config, progress=False, **kwargs)


# ---- the learner ------------------------------------------------------------------------------


def _custom_text_model(**text_overrides):
    """A tiny open_clip CustomTextCLIP (TextTransformer tower), another family than CLIP."""
    from open_clip.model import CustomTextCLIP

    text_cfg = dict(context_length=24, vocab_size=49408, width=48, heads=2, layers=2, proj_bias=True)
    text_cfg.update(text_overrides)
    torch.manual_seed(1)
    vision_cfg = dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16)
    return CustomTextCLIP(embed_dim=40, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()


def _families():
    from open_clip.tokenizer import SimpleTokenizer

    clip = _tiny()
    yield "clip", clip.model, clip.tokenizer
    yield "custom-text", _custom_text_model(), SimpleTokenizer(context_length=24)
    # CoCa-style tower: appended class token, pooled last, LayerNorm after pooling, padding mask
    yield "custom-text-cls", _custom_text_model(embed_cls=True, pad_id=0), SimpleTokenizer(context_length=24)


@pytest.mark.parametrize("position", ["end", "front", "middle"])
def test_learner_with_word_init_equals_encode_text_of_the_prompt(position):
    """Initialised from 'a photo of a', the learned prompt is the text prompt: the learner must
    give exactly the model's own encode_text of the written-out prompt, for every tower family."""
    names = ["cat", "sea otter", "x-ray film"]
    words = ["a", "photo", "of", "a"]
    for family, model, tokenizer in _families():
        learner = tr.PromptLearner(model, names, init="a photo of a", class_token_position=position, tokenizer=tokenizer)
        assert learner.n_ctx == 4
        texts = []
        for name in names:
            if position == "end":
                texts.append(" ".join(words + [name]) + ".")
            elif position == "front":
                texts.append(" ".join([name] + words) + ".")
            else:
                texts.append(" ".join(words[:2] + [name] + words[2:]) + ".")
        with torch.no_grad():
            expected = model.encode_text(tokenizer(texts))
            got = learner()
        assert got.shape == (len(names), expected.shape[1]), family
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=family)


def test_gradient_reaches_only_the_context():
    for family, model, tokenizer in _families():
        learner = tr.PromptLearner(model, ["cat", "dog"], init=None, n_ctx=5, tokenizer=tokenizer, seed=7)
        assert learner.ctx.shape == (5, learner.ctx.shape[1])
        assert all(not p.requires_grad for p in model.parameters()), family
        assert [n for n, p in learner.named_parameters() if p.requires_grad] == ["ctx"], family
        # a random context changes the embeddings, and the loss gradient reaches it
        X = torch.randn(6, learner().shape[1], generator=torch.Generator().manual_seed(0))
        loss = dk.ebm_loss(X, learner(), torch.tensor([0, 1, 0, 1, 1, 0]))
        loss.backward()
        assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0, family
        assert all(p.grad is None for p in model.parameters()), family


def test_random_init_is_seeded_and_learner_keeps_model_in_eval():
    clip = _tiny()
    a = tr.PromptLearner(clip.model, ["cat"], init=None, tokenizer=clip.tokenizer, seed=5)
    b = tr.PromptLearner(clip.model, ["cat"], init=None, tokenizer=clip.tokenizer, seed=5)
    c = tr.PromptLearner(clip.model, ["cat"], init=None, tokenizer=clip.tokenizer, seed=6)
    assert a.n_ctx == 16 and torch.equal(a.ctx, b.ctx) and not torch.equal(a.ctx, c.ctx)
    assert 0.01 < float(a.ctx.detach().std()) < 0.03  # N(0, 0.02²)
    a.train()
    assert a.training and not clip.model.training


def test_unsupported_tower_and_bad_arguments():
    clip = _tiny()

    class HFLikeModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = torch.nn.Linear(3, 3)

    with pytest.raises(TypeError, match="Hugging Face"):
        tr.PromptLearner(HFLikeModel(), ["cat"])
    with pytest.raises(ValueError, match="n_ctx must equal the number of tokens of init 'a photo of a' \\(4\\)"):
        tr.PromptLearner(clip.model, ["cat"], n_ctx=16, tokenizer=clip.tokenizer)
    with pytest.raises(ValueError, match="class_token_position"):
        tr.PromptLearner(clip.model, ["cat"], class_token_position="left", tokenizer=clip.tokenizer)
    with pytest.raises(ValueError, match="classnames"):
        tr.PromptLearner(clip.model, [], tokenizer=clip.tokenizer)
    with pytest.raises(TypeError, match="classnames"):
        tr.PromptLearner(clip.model, "cat", tokenizer=clip.tokenizer)
    with pytest.raises(ValueError, match=r"classnames\[1\] .*does not fit the tokenizer's context length 77"):
        tr.PromptLearner(clip.model, ["cat", "very " * 80], tokenizer=clip.tokenizer)
    with pytest.raises(ValueError, match="mask_ratio"):
        tr.TrainConfig(model=TINY_MODEL, train_dir=".", mask_ratio=1.0).validate()
    with pytest.raises(ValueError, match="optimizer"):
        tr.TrainConfig(model=TINY_MODEL, train_dir=".", optimizer="lbfgs").validate()


def test_warmup_cosine_schedule():
    factors = [tr.warmup_cosine(s, 4, 12) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and factors[8] == pytest.approx(0.5) and factors[11] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))
    assert tr.warmup_cosine(0, 0, 10) == 1.0


def test_few_shot_sampling(image_folder, tmp_path):
    samples, names = tr.few_shot_samples(image_folder, 4, seed=1)
    assert names == ["blue sky", "green leaf", "red apple"]  # sorted folders, '_' read as a space
    assert len(samples) == 12 and [sum(1 for _, y in samples if y == k) for k in range(3)] == [4, 4, 4]
    assert all(os.path.basename(os.path.dirname(p)).replace("_", " ") == names[y] for p, y in samples)
    assert samples == tr.few_shot_samples(image_folder, 4, seed=1)[0]
    assert samples != tr.few_shot_samples(image_folder, 4, seed=2)[0]
    assert len(tr.few_shot_samples(image_folder, 0)[0]) == 3 * IMAGES_PER_CLASS
    with pytest.warns(UserWarning, match="fewer than shots=10"):
        assert len(tr.few_shot_samples(image_folder, 10)[0]) == 3 * IMAGES_PER_CLASS
    names_file = tmp_path / "names.txt"
    names_file.write_text("sky\n# comment\nleaf\napple\n")
    assert tr.few_shot_samples(image_folder, 1, classnames_file=names_file)[1] == ["sky", "leaf", "apple"]
    names_file.write_text("sky\nleaf\n")
    with pytest.raises(ValueError, match="one name per class folder \\(3\\), got 2"):
        tr.few_shot_samples(image_folder, 1, classnames_file=names_file)


# ---- training ---------------------------------------------------------------------------------


def test_training_with_augmentation_changes_only_the_context(image_folder, tmp_path):
    result = _train(_config(image_folder, cache_image_features=False, epochs=2, out=str(tmp_path / "ck.pt")))
    fresh = _tiny().model
    trained = result.learner.model.state_dict()
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(trained[name], tensor), f"frozen {name} changed"
    untrained = tr.PromptLearner(fresh, result.learner.classnames, tokenizer=_tiny().tokenizer)
    assert not torch.allclose(untrained.ctx, result.learner.ctx)
    assert len(result.history) == 2 and len(result.step_times) == 2 * 3  # 12 images / batch 4


def test_training_loss_decreases_and_metrics_are_consistent(image_folder, tmp_path):
    result = _train(_config(image_folder, epochs=6, lam=0.5, out=str(tmp_path / "ck.pt")))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.05, losses
    for h in result.history:
        assert h["loss"] == pytest.approx(h["ce"] + 0.5 * h["delta_term"], rel=1e-5, abs=1e-6)
        assert 0.0 <= h["accuracy"] <= 1.0 and h["mean_delta_energy"] >= 0.0
    assert result.class_embeddings.shape == (3, 64)
    torch.testing.assert_close(result.class_embeddings.norm(dim=1), torch.ones(3))
    assert not result.learner.model.training


def test_gradient_accumulation_matches_a_larger_batch(image_folder):
    big = _train(_config(image_folder, epochs=2, batch_size=6))
    accumulated = _train(_config(image_folder, epochs=2, batch_size=3, accum_steps=2))
    small = _train(_config(image_folder, epochs=2, batch_size=3))
    # ctx entries are O(0.02): float rounding of the split sums stays far below the tolerance,
    # while half-size steps without accumulation land far outside it
    torch.testing.assert_close(accumulated.learner.ctx, big.learner.ctx, rtol=0, atol=1e-5)
    assert (small.learner.ctx - big.learner.ctx).abs().max() > 1e-3
    assert len(accumulated.step_times) == len(big.step_times) == 4 and len(small.step_times) == 8


def test_resume_gives_the_same_state_as_a_straight_run(image_folder, tmp_path):
    # augmentation on: the per-epoch reseeding must make the resumed epoch see the same crops
    settings = dict(cache_image_features=False, epochs=2, optimizer="adamw", lr=0.01)
    straight = _train(_config(image_folder, out=str(tmp_path / "straight.pt"), **settings))
    first = _train(_config(image_folder, out=str(tmp_path / "split.pt"), **settings), stop_after_epochs=1)
    assert len(first.history) == 1 and tr.load_checkpoint(tmp_path / "split.pt")["epoch"] == 1
    resumed = _train(_config(image_folder, out=str(tmp_path / "split.pt"), **settings), resume=tmp_path / "split.pt")
    assert torch.equal(resumed.learner.ctx, straight.learner.ctx)
    a, b = tr.load_checkpoint(tmp_path / "straight.pt"), tr.load_checkpoint(tmp_path / "split.pt")
    assert a["epoch"] == b["epoch"] == 2 and torch.equal(a["ctx"], b["ctx"])
    assert a["scheduler"] == b["scheduler"]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(a["optimizer"]["state"][0][key], b["optimizer"]["state"][0][key])
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6)
    # a resumed run must keep the settings that define it
    with pytest.raises(ValueError, match="lr=0.02 \\(checkpoint: 0.01\\)"):
        _train(_config(image_folder, out=str(tmp_path / "split.pt"), **{**settings, "lr": 0.02}), resume=tmp_path / "split.pt")


def test_checkpoint_contents_and_class_embeddings_from_checkpoint(image_folder, tmp_path):
    ckpt = tmp_path / "ck.pt"
    result = _train(_config(image_folder, epochs=1, out=str(ckpt), export_classes=str(tmp_path / "W.npy")))
    saved = tr.load_checkpoint(ckpt)
    assert saved["format"] == "deltakern-prompts" and saved["epoch"] == 1
    assert saved["classnames"] == ["blue sky", "green leaf", "red apple"]
    assert saved["settings"] == dataclasses.asdict(_config(image_folder, epochs=1, out=str(ckpt), export_classes=str(tmp_path / "W.npy")))
    assert torch.equal(saved["ctx"], result.learner.ctx.detach().cpu())
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes leave nothing behind

    clip = _tiny()
    W = tr.class_embeddings_from_checkpoint(ckpt, clip.model, clip.tokenizer, "cpu")
    assert W.dtype == torch.float32 and W.shape == (3, 64)
    torch.testing.assert_close(W, result.class_embeddings, rtol=0, atol=1e-6)
    with torch.no_grad():  # and it is the normalised learner output, computed independently
        torch.testing.assert_close(W, torch.nn.functional.normalize(result.learner(), dim=-1), rtol=0, atol=1e-6)
    assert all(p.requires_grad for p in clip.model.parameters())  # the caller's model is left as it was
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "W.npy")), W, rtol=0, atol=1e-6)

    other = _custom_text_model()
    with pytest.raises(ValueError, match="text width 48 does not match the checkpoint's context width 64"):
        tr.class_embeddings_from_checkpoint(ckpt, other, None, "cpu")
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"a": 1}, tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="not a deltakern prompt checkpoint"):
        tr.load_checkpoint(tmp_path / "junk.pt")


@pytest.mark.slow
def test_cli_trains_resumes_exports_and_score_uses_the_prompts(image_folder, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")  # the clip extra

    from deltakern.cli import main

    ckpt, W_path = tmp_path / "ck.pt", tmp_path / "W.npy"
    common = ["--model", TINY_MODEL, "--pretrained", "none", "--train", image_folder, "--shots", "3",
              "--batch-size", "3", "--cache-image-features", "--workers", "0", "--quiet", "--init", "none", "--n-ctx", "3",
              "--precision", "fp32"]  # the float32 oracle below
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", *common, "--epochs", "2", "--stop-after-epochs", "1", "--out", str(ckpt)]) == 0
        assert tr.load_checkpoint(ckpt)["epoch"] == 1
        # resume needs no repeated options; a conflicting one is an error naming it
        assert main(["train", "--resume", str(ckpt), "--lam", "3", "--quiet"]) == 2
        assert main(["train", "--resume", str(ckpt), "--quiet"]) == 0
        assert tr.load_checkpoint(ckpt)["epoch"] == 2
        # finished run: only exports
        assert main(["train", "--resume", str(ckpt), "--export-classes", str(W_path), "--quiet"]) == 0
        assert main(["train", "--model", TINY_MODEL, "--quiet"]) == 2  # --train/--out missing
        clip = _tiny()
        W = tr.class_embeddings_from_checkpoint(ckpt, clip.model, clip.tokenizer, "cpu")
        torch.testing.assert_close(torch.from_numpy(np.load(W_path)), W, rtol=0, atol=1e-6)
        saved = tr.load_checkpoint(ckpt)
        assert saved["settings"]["n_ctx"] == 3 and saved["settings"]["init"] is None and saved["ctx"].shape == (3, 64)

        out = tmp_path / "scores.parquet"
        code = main(["score", "--images", image_folder, "--model", TINY_MODEL, "--pretrained", "none",
                     "--prompts", str(ckpt), "--out", str(out), "--workers", "0", "--batch-size", "8",
                     "--precision", "fp32"])
    assert code == 0
    table = pq.read_table(out).sort_by("id").to_pydict()
    # the scores are those of the image features against the learned class embeddings
    from PIL import Image

    with torch.no_grad():
        X = torch.stack([clip.preprocess(Image.open(os.path.join(image_folder, i)).convert("RGB")) for i in table["id"]])
        X = clip.model.encode_image(X)
    expected = dk.score(X, W)
    assert len(table["id"]) == 3 * IMAGES_PER_CLASS
    np.testing.assert_allclose(table["delta_energy"], expected.delta_energy.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(table["pred"], expected.pred.numpy())


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process_with_the_same_global_batch(image_folder, tmp_path):
    args = ["--model", TINY_MODEL, "--pretrained", "none", "--train", image_folder, "--shots", "4",
            "--epochs", "2", "--cache-image-features", "--workers", "0", "--quiet", "--lr", "0.05", "--seed", "3",
            "--precision", "fp32"]  # as _config: both runs round alike
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    ddp_ckpt = tmp_path / "ddp.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "deltakern.cli", "train", *args, "--batch-size", "3", "--out", str(ddp_ckpt)],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _train(_config(image_folder, shots=4, epochs=2, batch_size=6, lr=0.05, seed=3))
    ddp = tr.load_checkpoint(ddp_ckpt)
    assert ddp["world_size"] == 2 and ddp["epoch"] == 2
    # float rounding of the all-reduced gradient vs the one-process sum stays far below the
    # tolerance; one process with the per-rank batch (a different run) lands far outside it
    torch.testing.assert_close(ddp["ctx"], single.learner.ctx.detach(), rtol=0, atol=1e-5)
    per_rank_batch = _train(_config(image_folder, shots=4, epochs=2, batch_size=3, lr=0.05, seed=3))
    assert (per_rank_batch.learner.ctx.detach() - ddp["ctx"]).abs().max() > 1e-3
    # the logged epoch metrics are over the whole global batch, as in one process
    for a, b in zip(ddp["history"], single.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["accuracy"] == pytest.approx(b["accuracy"])


def test_benchmark_steps_reports_rates():
    clip = _tiny()
    for cached in (True, False):
        report = tr.benchmark_steps(clip, num_classes=5, batch_size=4, steps=2, warmup_steps=1, cache_image_features=cached)
        assert report["steps_per_second"] > 0 and len(report["step_times"]) == 2
        assert report["cache_image_features"] is cached and report["n_ctx"] == 4


def test_benchmark_steps_times_real_optimizer_steps(monkeypatch):
    """Each timed step encodes (unless cached), runs the loss backward and steps the optimizer;
    the reported rate is the median step's."""
    clip = _tiny()
    calls = {"encode": 0, "optimizer": 0, "backward": 0}
    encode_image = clip.model.encode_image

    def counting_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode_image(*args, **kwargs)

    sgd_step = torch.optim.SGD.step

    def counting_step(self, *args, **kwargs):
        calls["optimizer"] += 1
        # The context must have a gradient from the loss when the optimizer steps.
        assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for g in self.param_groups for p in g["params"])
        return sgd_step(self, *args, **kwargs)

    monkeypatch.setattr(clip.model, "encode_image", counting_encode)
    monkeypatch.setattr(torch.optim.SGD, "step", counting_step)
    for cached, encodes in ((False, 5), (True, 1)):
        calls.update(encode=0, optimizer=0)
        report = tr.benchmark_steps(clip, num_classes=5, batch_size=4, steps=3, warmup_steps=2, cache_image_features=cached)
        assert calls["encode"] == encodes and calls["optimizer"] == 5
        times = report["step_times"]
        assert len(times) == 3 and report["steps_per_second"] == pytest.approx(1.0 / sorted(times)[1])



def test_a_second_run_on_the_same_checkpoint_is_refused(image_folder, tmp_path):
    """Two trainings writing one checkpoint would interleave their epochs: the second is refused
    before it loads anything, and the lock dies with its holder."""
    from deltakern.data.rundir import RunLocked, output_lock

    out = tmp_path / "prompts.pt"
    with output_lock(tmp_path / ".prompts.pt.lock", "a training run held by this test"):
        with pytest.raises(RunLocked, match="is already running"):
            _train(_config(image_folder, out=str(out), epochs=1))
    assert not out.exists()
    _train(_config(image_folder, out=str(out), epochs=1))  # released: the same run now goes ahead
    assert out.is_file()

"""The image-conditioned tasks end to end at size=tiny: checkpoints trained a few steps by train.py's pipeline
(ldm_sr_f4, ldm_inpaint_f4, ldm_semantic_f4 and a text model for img2img), every `task=` of sample.py, the
task metrics of evaluate.py, and the bad inputs (each a clear error naming the fix)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from ldm.data.shapes import cell_box, render_sample_with_map
from ldm.diffusion.consistency import back_project, paste_known
from ldm.evaluation.tasks import evaluate_task, object_cell_masks
from ldm.inference.tasks import sample_task
from ldm.loading.checkpoints import load_latent_diffusion
from ldm.metrics.image_quality import l1, pooled_psnr, psnr, ssim
from ldm.metrics.shapes_classifier import (
    save_shapes_classifier,
    train_shapes_classifier,
)
from ldm.training.pipeline import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 32
EXPERIMENTS = {"sr": "ldm_sr_f4", "inpaint": "ldm_inpaint_f4", "semantic": "ldm_semantic_f4", "img2img": "ldm_f4_text"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def checkpoints(workdir) -> dict[str, str]:
    """One tiny checkpoint per task: 3 steps of stage 2 on a 2-step stage 1 (shared by the f=4 experiments)."""
    found = {}
    for task, experiment in EXPERIMENTS.items():
        overrides = [
            f"experiment={experiment}", "size=tiny", "logger=csv", f"paths.output_dir={workdir}/{task}",
            f"paths.log_dir={workdir}/outputs", f"paths.cache_dir={workdir}/cache", f"paths.data_dir={workdir}/data",
            f"data.resolution={RES}", "data.num_train=32", "data.num_val=8", "data.batch_size=4", "data.num_workers=0",
            "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.limit_val_batches=1",
            "first_stage.overrides=['trainer.max_steps=2','data.batch_size=4','model.loss.perceptual_weight=0']",
            "callbacks.sample_grid.every_n_steps=3", "sampling.steps=2",
            "callbacks.sample_grid.samples_per_condition=1",
        ]
        with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base="1.3"):
            result = train(compose(config_name="train", overrides=overrides))
        assert os.path.isfile(os.path.join(result.output_dir, "images", "samples_step0000003.png"))
        found[task] = result.last_ckpt
    return found


@pytest.fixture(scope="module")
def inputs(workdir) -> dict[str, str]:
    """A shapes val image, its x4 low-res version, its semantic map and a mask, as PNG files."""
    rng = np.random.default_rng(0)
    image = np.asarray(Image.new("RGB", (RES, RES), (30, 30, 30))).copy()
    image[8:20, 10:22] = (220, 20, 20)
    labels = np.zeros((RES, RES), np.uint8)
    labels[8:20, 10:22] = 4  # red square
    mask = np.zeros((RES, RES), np.uint8)
    mask[4:16, 4:20] = 255
    files = {"image": Image.fromarray(image), "lowres": Image.fromarray(image).resize((RES // 4, RES // 4), Image.BICUBIC),
             "map": Image.fromarray(labels, mode="L"), "mask": Image.fromarray(mask, mode="L"),
             "grey": Image.fromarray(image).convert("L"), "rgba": Image.fromarray(image).convert("RGBA"),
             "soft_mask": Image.fromarray((mask // 2 + rng.integers(0, 2, mask.shape)).astype(np.uint8), mode="L"),
             "small_mask": Image.fromarray(mask[:16, :16], mode="L")}
    paths = {}
    for name, picture in files.items():
        paths[name] = str(workdir / f"{name}.png")
        picture.save(paths[name])
    return paths


def run_sample(*overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *overrides],
                          capture_output=True, text=True, env=env, timeout=300)


TASK_ARGS = {
    "sr": lambda p: [f"image={p['lowres']}"],
    "inpaint": lambda p: [f"image={p['image']}", f"mask={p['mask']}", "prompt=a red square at the center"],
    "semantic": lambda p: [f"map={p['map']}"],
    "img2img": lambda p: [f"image={p['image']}", "strength=0.5", "prompt=a red square at the center"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_ARGS))
def test_sample_py_runs_every_task(task, checkpoints, inputs, tmp_path):
    out = tmp_path / "out"
    proc = run_sample(f"ckpt={checkpoints[task]}", f"task={task}", *TASK_ARGS[task](inputs), "n=3", "batch_size=2",
                      "sampling.steps=3", "sampling.cfg_scale=2", "sampling.seed=4", f"out={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((out / "samples.json").read_text())
    assert [r["file"] for r in records] == ["00000.png", "00001.png", "00002.png"]
    assert [r["seed"] for r in records] == [4, 5, 6] and all(r["task"] == task for r in records)
    assert all(r["steps"] == 3 and r["ckpt"] == checkpoints[task] for r in records)
    if task == "img2img":
        assert all(r["strength"] == 0.5 for r in records)
    with Image.open(out / "00000.png") as image:
        assert image.size == (RES, RES)  # sr: 8 px low-res x 4
    with Image.open(out / "grid.png") as grid:  # condition | 3 samples, 2-px padding
        assert grid.size == (2 + 4 * (RES + 2), 2 + RES + 2)


def test_task_samples_are_seeded_per_sample(checkpoints, inputs, tmp_path):
    settings = dict(task="inpaint", image=inputs["image"], mask=inputs["mask"], prompts=["a red square"], n=3,
                    sampling={"steps": 2, "seed": 9})
    sample_task(checkpoints["inpaint"], str(tmp_path / "a"), batch_size=3, **settings)
    sample_task(checkpoints["inpaint"], str(tmp_path / "b"), batch_size=1, **settings)
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i:05d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / f"{i:05d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("case, task, kwargs, message", [
    ("mask of the wrong size", "inpaint", {"image": "image", "mask": "small_mask"}, "must have the image's size"),
    ("mask not binary", "inpaint", {"image": "image", "mask": "soft_mask"}, "is not binary"),
    ("grey image", "inpaint", {"image": "grey", "mask": "mask"}, "has mode L, not RGB. Convert it"),
    ("RGBA image", "sr", {"image": "rgba"}, "has mode RGBA, not RGB. Convert it"),
    ("no mask", "inpaint", {"image": "image"}, "task=inpaint needs mask=PATH"),
    ("task the model was not trained for", "semantic", {"semantic_map": "map"},
     "was not trained for task=semantic (it is conditioned on sr)"),
    ("img2img on a concat model", "img2img", {"image": "image"}, "it runs: task=sr"),
    ("sr on a text model", "sr", {"image": "lowres"}, "experiment=ldm_sr_f4"),
    ("unknown task", "deblur", {"image": "image"}, "Unknown task='deblur'"),
])
def test_bad_task_inputs_are_clear_errors(case, task, kwargs, message, checkpoints, inputs, tmp_path):
    ckpt = {"mask of the wrong size": "inpaint", "mask not binary": "inpaint", "grey image": "inpaint",
            "no mask": "inpaint", "sr on a text model": "img2img"}.get(case, "sr")
    arguments = {key: inputs[value] for key, value in kwargs.items()}
    prompts = ["a red square"] if ckpt in ("inpaint", "img2img") else []  # the sr model takes no prompt
    with pytest.raises(ValueError) as error:
        sample_task(checkpoints[ckpt], str(tmp_path / "out"), task, prompts=prompts, sampling={"steps": 1},
                    **arguments)
    assert message in str(error.value)


def test_tasks_sample_non_square_inputs_at_their_aspect(checkpoints, tmp_path):
    """A 32x64 (H x W) input gives 32x64 samples (SR: an 8x16 low-res image x4; inpainting: image and mask); a
    side that the model's downsampling (8 or more: f = 4 and a UNet level) does not divide is refused with the
    multiple to use."""
    height, width = RES, RES * 2
    image = np.zeros((height, width, 3), np.uint8)
    image[8:20, 10:40] = (220, 20, 20)
    mask = np.zeros((height, width), np.uint8)
    mask[4:16, 4:36] = 255
    files = {"image": Image.fromarray(image), "mask": Image.fromarray(mask, mode="L"),
             "lowres": Image.fromarray(image).resize((width // 4, height // 4), Image.BICUBIC),
             "odd": Image.fromarray(image[:, :36]).resize((9, height // 4), Image.BICUBIC)}
    paths = {name: str(tmp_path / f"{name}.png") for name in files}
    for name, picture in files.items():
        picture.save(paths[name])
    arguments = {"sr": {"image": paths["lowres"]}, "inpaint": {"image": paths["image"], "mask": paths["mask"]}}
    for task, kwargs in arguments.items():
        prompts = ["a red square"] if task == "inpaint" else []
        sample_task(checkpoints[task], str(tmp_path / task), task, prompts=prompts, n=1, sampling={"steps": 1}, **kwargs)
        with Image.open(tmp_path / task / "00000.png") as sample:
            assert sample.size == (width, height), task
    with pytest.raises(ValueError, match="a side not a multiple of"):  # 8x9 low-res -> 32x36: 36 is no multiple of 8
        sample_task(checkpoints["sr"], str(tmp_path / "odd"), "sr", image=paths["odd"], n=1, sampling={"steps": 1})


@pytest.mark.slow
def test_concat_checkpoint_sampled_without_its_condition_exits_with_the_fix(checkpoints, inputs, tmp_path):
    proc = run_sample(f"ckpt={checkpoints['inpaint']}", "prompt=a red square", "sampling.steps=1", f"out={tmp_path}/out")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output
    assert "image-conditioned model (task=inpaint)" in output and "task=inpaint image=IMAGE.png mask=MASK.png" in output
    proc = run_sample(f"ckpt={checkpoints['sr']}", "task=inpaint", f"image={inputs['image']}", f"mask={inputs['mask']}",
                      "sampling.steps=1", f"out={tmp_path}/out2")
    assert proc.returncode == 2 and "was not trained for task=inpaint" in proc.stdout + proc.stderr


# ---------------------------------------------------------------- evaluate.py task=
@pytest.fixture(scope="module")
def classifier(workdir) -> str:
    path = str(workdir / f"shapes_classifier_{RES}px.safetensors")
    save_shapes_classifier(train_shapes_classifier(RES, steps=20, batch_size=16), path, RES)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("task, keys", [
    ("sr", ["psnr_sample", "psnr_bicubic", "ssim_sample", "ssim_bicubic", "fid_sample", "fid_bicubic",
            "psnr_reconstruction", "psnr_sample_raw", "fid_sample_raw"]),
    ("inpaint", ["psnr_inside_sample", "l1_inside_sample", "psnr_inside_median_fill", "psnr_outside_sample",
                 "psnr_outside_reconstruction", "fid_sample", "object_fill_color", "object_removed_color",
                 "psnr_outside_object_fill", "psnr_outside_object_reconstruction", "psnr_outside_sample_raw",
                 "fid_sample_raw", "psnr_outside_object_fill_raw"]),
    ("semantic", ["agreement_sample", "agreement_chance", "agreement_real", "object_agreement_sample"]),
])
def test_evaluate_task_reports_metric_and_baseline(task, keys, checkpoints, classifier, workdir, tmp_path):
    data = {"_target_": "ldm.data.webdataset.ShapesDataModule", "root": f"{workdir}/data/shapes_{RES}px",
            "resolution": RES, "num_train": 32, "num_val": 8, "batch_size": 4, "num_workers": 0}
    metrics = evaluate_task(task, str(tmp_path), checkpoints[task], data, num_samples=8, sampling={"steps": 2}, batch_size=8,
                            features={"name": "shapes_cnn", "weights_path": classifier}, cache_dir=str(tmp_path / "c"))
    assert all(isinstance(metrics[key], float) for key in keys)
    assert metrics["num_samples"] == 8 and metrics["fid_name"] == "FID_shapes_cnn"
    if task == "semantic":
        assert metrics["agreement_real"] > 0.95  # the colour judge on the real images: its ceiling
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["task"] == task and len(os.listdir(tmp_path / "samples")) == 8
    with Image.open(tmp_path / "grid.png") as grid:  # condition | sample | reference, 8 rows
        assert grid.size == (2 + 3 * (RES + 2), 2 + 8 * (RES + 2))
    if task == "inpaint":  # the object-cell pass has its own grid
        assert (tmp_path / "object_grid.png").is_file()
        assert metrics["psnr_outside_sample"] == 100.0  # the known pixels pasted back: exact (the cap)
        assert metrics["psnr_outside_sample_raw"] < 100.0
    if task == "sr":  # back-projection moves the sample towards the low-res input's image
        assert metrics["psnr_sample"] > metrics["psnr_sample_raw"]


# ---------------------------------------------------------------- the metrics themselves
def test_ssim_is_wang_et_al_on_valid_windows_as_torchmetrics():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 40, dtype=torch.float64)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    _, full = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none", return_full_image=True)
    reference = full[..., 5:-5, 5:-5].flatten(1).mean(1)  # torchmetrics pads by reflection: keep the valid windows
    torch.testing.assert_close(ssim(y * 2 - 1, x * 2 - 1), reference)
    assert torch.allclose(ssim(x * 2 - 1, x * 2 - 1), torch.ones(3, dtype=torch.float64))


def test_masked_psnr_and_l1_count_only_the_masked_pixels():
    a = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[..., :2, :] = 51  # 0.2 off in the top half
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    torch.testing.assert_close(psnr(b, a, mask), torch.tensor([-10 * np.log10(0.04)], dtype=torch.float64))
    torch.testing.assert_close(l1(b, a, 1 - mask), torch.tensor([0.0], dtype=torch.float64))
    torch.testing.assert_close(psnr(b, a), torch.tensor([-10 * np.log10(0.02)], dtype=torch.float64))


def test_pooled_psnr_is_one_mse_over_all_masked_pixels_and_finite_where_an_image_is_exact():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0, :, :2, :] = 51  # image 0: 0.2 off in the top half; image 1: exact
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2, :] = 1
    assert torch.isinf(psnr(b, a, mask)[1])  # the per-image PSNR of the exact image
    assert pooled_psnr(b, a, mask) == pytest.approx(-10 * np.log10(0.04 / 2))  # half the masked pixels 0.2 off
    assert pooled_psnr(b, a) == pytest.approx(-10 * np.log10(0.04 / 4))


def test_object_cell_masks_cover_every_object_pixel_and_leave_the_rest_known():
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, attributes, semantic = render_sample_with_map(rng, 48)
        mask = object_cell_masks([attributes["caption"]], torch.zeros(1, 1, 48, 48))[0, 0]
        on_object = torch.from_numpy(np.array(semantic)) > 0
        assert bool(mask[on_object].all())  # the object is hidden entirely
        assert 0.1 < float(mask.mean()) < 0.16  # one cell of nine (+ a 1 px margin), not the image
    with pytest.raises(ValueError, match="unknown position"):
        cell_box("the middle", 48)


def test_inpainting_keeps_the_known_latent_cells_unless_told_not_to(checkpoints):
    """keep_known (the default): every latent cell none of whose pixels is masked ends at the masked image's
    latent, so the known region decodes as the autoencoder reconstructs it; keep_known=false leaves it to the model."""
    model = load_latent_diffusion(checkpoints["inpaint"])
    image = torch.rand(2, 3, RES, RES) * 2 - 1
    mask = torch.zeros(2, 1, RES, RES)
    mask[:, :, 4:18, 6:21] = 1  # not aligned to the 4x4 cells: the partly masked cells are generated
    batch = {"caption": ["a red square at the top", "a blue circle at the left"], "image": image, "mask": mask}
    finals = {}
    for keep in (True, False):
        seen = []
        model.generate(batch, sampler="dpmpp_2m", steps=3, cfg_scale=3.0, keep_known=keep, callback=lambda i, t, z: seen.append(z))
        finals[keep] = seen[-1]
    keep_cells = 1 - torch.nn.functional.max_pool2d(mask, 4)
    known = model.encode_condition(image * (1 - mask))
    assert int(keep_cells.sum()) < keep_cells.numel()  # some cells generated, some kept
    assert torch.equal(finals[True] * keep_cells, known * keep_cells)  # dpmpp_2m lands on clean: exactly the latent
    assert not torch.allclose(finals[False] * keep_cells, known * keep_cells)


# ---------------------------------------------------------------- pixel consistency
def _bicubic_down(images, size):
    return torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False)


def test_back_projection_makes_the_image_explain_its_low_res_input_and_keeps_its_detail():
    """Irani & Peleg: after back-projection, downsampling the image gives the low-res input (the degradation's
    bicubic, PIL-like); the starting image's high frequencies survive (the result is not bicubic upsampling)."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    lowres = _bicubic_down(truth, (8, 8))
    offset = 0.3 * torch.randn(2, 3, 1, 1, generator=generator)  # a "sample": right detail, off colours
    start = truth + offset + 0.05 * torch.randn(2, 3, 32, 32, generator=generator)
    projected = back_project(start, lowres)
    assert (_bicubic_down(start, (8, 8)) - lowres).abs().mean() > 0.05
    assert (_bicubic_down(projected, (8, 8)) - lowres).abs().mean() < 2e-3
    upsampled = torch.nn.functional.interpolate(lowres, size=(32, 32), mode="bicubic", align_corners=False)
    assert (projected - truth).pow(2).mean() < (upsampled - truth).pow(2).mean()  # detail kept, not blurred away
    assert torch.allclose(back_project(truth, lowres), truth, atol=0.02)  # an image that explains it barely moves
    with pytest.raises(ValueError, match="cannot be the high-res version"):
        back_project(lowres, truth)


def test_paste_known_takes_exactly_the_known_pixels_from_the_image():
    images, known = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    pasted = paste_known(images, known, mask)
    assert torch.equal(pasted[..., :2, :], images[..., :2, :]) and torch.equal(pasted[..., 2:, :], known[..., 2:, :])


@pytest.mark.parametrize("task", ["inpaint", "sr"])
def test_pixel_consistency_is_applied_by_generate_unless_turned_off(task, checkpoints):
    """sampling.pixel_consistency (the default): an inpainting sample equals the image outside its mask; an SR
    sample downsamples to its low-res input. false: the decoder's output as it is."""
    model = load_latent_diffusion(checkpoints[task])
    image = torch.rand(2, 3, RES, RES, generator=torch.Generator().manual_seed(1)) * 2 - 1
    captions = ["a red square at the top", "a blue circle at the left"]
    if task == "inpaint":
        mask = torch.zeros(2, 1, RES, RES)
        mask[:, :, 4:18, 6:21] = 1
        batch = {"caption": captions, "image": image, "mask": mask}
        error = lambda out: float((out - image).mul(1 - mask).abs().max())  # noqa: E731
    else:
        lowres = _bicubic_down(image, (RES // 4, RES // 4))
        batch = {"lowres": lowres}
        error = lambda out: float((_bicubic_down(out, (RES // 4, RES // 4)) - lowres).abs().mean())  # noqa: E731
    on = model.generate(batch, sampler="dpmpp_2m", steps=2, cfg_scale=3.0, image_size=RES)
    off = model.generate(batch, sampler="dpmpp_2m", steps=2, cfg_scale=3.0, image_size=RES, pixel_consistency=False)
    assert error(on) < (1e-6 if task == "inpaint" else 0.02) < error(off)

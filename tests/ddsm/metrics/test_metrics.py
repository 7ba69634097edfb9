"""Tests for ddsm.metrics: known answers, and agreement with independent oracles.

Oracles: cityscapesscripts' pixel-level evaluation (IoU) run on PNG files, and the slow boundary
F-score reference in benchmarks/_reference_boundary.py (seg2bmap + one disk dilation per class and
tolerance, written from the protocol and sharing no code with ddsm.metrics).
"""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from benchmarks._reference_boundary import reference_boundary_fscore, reference_seg2bmap
from ddsm.config import ConfigError
from ddsm.metrics import BoundaryFScore, BoundaryIoU, ConfusionMatrix, boundary_fscore, seg2bmap
from ddsm.metrics.boundary import _class_boundary_points

IGNORE = 255


# ----------------------------------------------------------------------------- label-map makers


def random_map(rng: np.random.Generator, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Independent random label per pixel: boundaries everywhere."""
    return rng.integers(0, num_classes, shape).astype(np.uint8)


def blocky_map(rng: np.random.Generator, shape: tuple[int, int], num_classes: int,
               cell: int = 6) -> np.ndarray:
    """Random labels on a coarse grid upsampled by `cell`: region-like maps."""
    low = rng.integers(0, num_classes, (shape[0] // cell + 1, shape[1] // cell + 1))
    return np.kron(low, np.ones((cell, cell), dtype=np.int64))[: shape[0], : shape[1]].astype(np.uint8)


def structured_map(rng: np.random.Generator, shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Background plus random rectangles and disks (curved and straight edges, touching borders)."""
    labels = np.zeros(shape, dtype=np.uint8)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(6):
        k = rng.integers(1, num_classes)
        y, x = rng.integers(-5, shape[0]), rng.integers(-5, shape[1])
        if rng.random() < 0.5:
            labels[max(y, 0): y + rng.integers(3, 20), max(x, 0): x + rng.integers(3, 25)] = k
        else:
            labels[(yy - y) ** 2 + (xx - x) ** 2 <= rng.integers(2, 12) ** 2] = k
    return labels


def perturb(rng: np.random.Generator, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """A prediction: the ground truth shifted by a few pixels with some random blocks relabelled."""
    pred = np.roll(gt, (int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)).copy()
    for _ in range(3):
        y, x = rng.integers(0, gt.shape[0]), rng.integers(0, gt.shape[1])
        pred[y: y + rng.integers(2, 9), x: x + rng.integers(2, 9)] = rng.integers(0, num_classes)
    return pred


def with_ignore(rng: np.random.Generator, gt: np.ndarray) -> np.ndarray:
    """Ground truth with an ignore band on the border, a block and scattered pixels."""
    gt = gt.copy()
    gt[:, :2] = IGNORE
    y, x = rng.integers(0, gt.shape[0] - 8), rng.integers(0, gt.shape[1] - 8)
    gt[y: y + 8, x: x + 10] = IGNORE
    gt[rng.random(gt.shape) < 0.03] = IGNORE
    return gt


def make_pairs(seed: int, kind: str, ignore: bool, n: int = 3, shape: tuple[int, int] = (40, 56),
               num_classes: int = 6) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`n` (pred, gt) pairs of one kind: random, blocky or structured maps."""
    rng = np.random.default_rng(seed)
    maker = {"random": random_map, "blocky": blocky_map, "structured": structured_map}[kind]
    gts = [maker(rng, shape, num_classes) for _ in range(n)]
    preds = [perturb(rng, gt, num_classes) for gt in gts]
    if ignore:
        gts = [with_ignore(rng, gt) for gt in gts]
    return preds, gts


def assert_same_scores(ours: list[float], ref: list[float], tol: float = 1e-9) -> None:
    """Equal within `tol`, with nan in exactly the same places."""
    ours, ref = np.asarray(ours, dtype=float), np.asarray(ref, dtype=float)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], rtol=0, atol=tol)


# ----------------------------------------------------------------------------- ConfusionMatrix


def test_confusion_matrix_known_answer():
    target = torch.tensor([[0, 0, 1], [1, 2, IGNORE]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert torch.equal(cm.mat, expected)
    out = cm.compute()
    # class 0: tp 1, gt 2, pred 2 -> 1/3; class 1: tp 2, gt 2, pred 3 -> 2/3; class 2: 0/1;
    # class 3 appears nowhere -> absent, nan, left out of the mean
    assert out["per_class_iou"][:3] == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(out["per_class_iou"][3])
    assert out["absent_classes"] == [3]
    assert out["miou"] == pytest.approx(1 / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)
    assert out["mean_acc"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)


def test_confusion_matrix_batches_reset_and_bad_labels():
    rng = np.random.default_rng(0)
    gt = torch.from_numpy(blocky_map(rng, (16, 20), 5)).long()
    batch_pred = torch.stack([gt, torch.flip(gt, dims=(1,))])  # (2, H, W)
    batch_gt = torch.stack([gt, gt])  # (2, H, W)
    cm_batch, cm_loop = ConfusionMatrix(5), ConfusionMatrix(5)
    cm_batch.update(batch_pred, batch_gt)
    for p, g in zip(batch_pred, batch_gt):
        cm_loop.update(p, g)
    assert torch.equal(cm_batch.mat, cm_loop.mat)
    assert int(cm_batch.mat.sum()) == batch_gt.numel()
    cm_batch.all_reduce()  # no process group: must leave the counts alone
    assert torch.equal(cm_batch.mat, cm_loop.mat)
    cm_batch.reset()
    assert int(cm_batch.mat.sum()) == 0
    with pytest.raises(ValueError, match="0..4"):
        cm_batch.update(torch.full((2, 2), 7), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="0..4"):
        cm_batch.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_confusion_matrix_on_cuda_matches_cpu():
    preds, gts = make_pairs(seed=2, kind="blocky", ignore=True, n=2)
    pred, gt = torch.from_numpy(np.stack(preds)).long(), torch.from_numpy(np.stack(gts)).long()
    on_cpu, on_gpu = ConfusionMatrix(6), ConfusionMatrix(6)
    on_cpu.update(pred, gt)
    on_gpu.update(pred.cuda(), gt.cuda())
    assert on_gpu.mat.is_cuda
    assert torch.equal(on_gpu.mat.cpu(), on_cpu.mat)


def _cityscapes_oracle(tmp_path, preds: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    """Run cityscapesscripts' pixel-level evaluation on label maps written as labelIds PNGs."""
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import trainId2label

    to_label_id = np.zeros(256, dtype=np.uint8)  # trainId -> labelId; 255 -> 0 ("unlabeled")
    for train_id in range(19):
        to_label_id[train_id] = trainId2label[train_id].id
    pred_files, gt_files = [], []
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        pred_files.append(str(tmp_path / f"img{i}_pred_labelIds.png"))
        gt_files.append(str(tmp_path / f"img{i}_gtFine_labelIds.png"))
        Image.fromarray(to_label_id[pred]).save(pred_files[-1])
        Image.fromarray(to_label_id[gt]).save(gt_files[-1])
    args = cs_eval.args
    args.evalInstLevelScore, args.evalPixelAccuracy = False, False
    args.JSONOutput, args.quiet = False, True
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)
    per_class = [result["classScores"][trainId2label[t].name] for t in range(19)]
    return {"per_class_iou": per_class, "miou": result["averageScoreClasses"]}


@pytest.mark.parametrize("kind", ["random", "blocky", "structured"])
def test_confusion_matrix_matches_cityscapesscripts(tmp_path, kind):
    # 19 Cityscapes train ids, but the maps use only some of them so absent classes occur
    preds, gts = make_pairs(seed=1, kind=kind, ignore=True, n=3, num_classes=12)
    cm = ConfusionMatrix(19)
    for pred, gt in zip(preds, gts):
        cm.update(torch.from_numpy(pred).long(), torch.from_numpy(gt).long())
    ours = cm.compute()
    oracle = _cityscapes_oracle(tmp_path, preds, gts)
    assert_same_scores(ours["per_class_iou"], oracle["per_class_iou"], tol=1e-12)
    assert ours["miou"] == pytest.approx(oracle["miou"], abs=1e-12)
    assert ours["absent_classes"] == [k for k in range(19) if math.isnan(oracle["per_class_iou"][k])]
    assert ours["absent_classes"], "the maps should leave some classes absent"


# ----------------------------------------------------------------------------- seg2bmap


@pytest.mark.parametrize("shape", [(1, 9), (9, 1), (2, 2), (17, 23)])
def test_seg2bmap_matches_reference(shape):
    rng = np.random.default_rng(3)
    for density in (0.1, 0.5, 0.9):
        mask = rng.random(shape) < density
        np.testing.assert_array_equal(seg2bmap(mask), reference_seg2bmap(mask))
        np.testing.assert_array_equal(seg2bmap(torch.from_numpy(mask)), reference_seg2bmap(mask))


def test_seg2bmap_known_answer():
    mask = np.zeros((4, 5), dtype=np.uint8)
    mask[1:3, 1:3] = 1  # 2x2 square
    expected = np.zeros((4, 5), dtype=bool)
    expected[0, 0:3] = True  # row above: the down or down-right neighbour is in the square
    expected[1:3, 0] = True  # column to the left: the right neighbour is in the square
    expected[1, 2] = True  # square pixels with a right, down or down-right neighbour outside;
    expected[2, 1:3] = True  # (1, 1) has all three inside, so it is not a boundary pixel
    np.testing.assert_array_equal(seg2bmap(mask), expected)


@pytest.mark.parametrize("kind", ["random", "blocky", "structured"])
def test_all_class_boundaries_in_one_pass(kind):
    _, gts = make_pairs(seed=4, kind=kind, ignore=True, n=1)
    labels = np.minimum(gts[0], 6)  # ignore -> 6 = "no class", as the metric does internally
    points = _class_boundary_points(labels, 6)
    for k in range(6):
        ours = np.zeros(labels.shape, dtype=bool)
        ours[points[points[:, 2] == k, 0], points[points[:, 2] == k, 1]] = True
        np.testing.assert_array_equal(ours, reference_seg2bmap(labels == k))
    assert len(np.unique(points, axis=0)) == len(points)  # each (pixel, class) once


# ----------------------------------------------------------------------------- boundary F-score


@pytest.mark.parametrize("kind", ["random", "blocky", "structured"])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("absent_as_one", [False, True])
def test_boundary_fscore_matches_reference(kind, ignore, absent_as_one):
    tolerances = [1, 2, 3, 5]
    preds, gts = make_pairs(seed=5, kind=kind, ignore=ignore, n=3, num_classes=6)
    preds[0][:] = 0  # a constant prediction: no predicted boundary at all
    metric = BoundaryFScore(7, tolerances, absent_as_one=absent_as_one)  # class 6 never appears
    for pred, gt in zip(preds, gts):
        metric.update(pred, gt)
    ours = metric.compute()
    ref = reference_boundary_fscore(preds, gts, 7, tolerances, absent_as_one=absent_as_one)
    assert ours["tolerances_px"] == tolerances
    for tol in tolerances:
        ref_mean, ref_per_class = ref[tol]
        assert_same_scores(ours["bf_per_class"][tol], ref_per_class)
        assert ours[f"bf_{tol}px"] == pytest.approx(ref_mean, abs=1e-9)
    assert math.isnan(ours["bf_per_class"][1][6]) != absent_as_one


def test_boundary_fscore_fractional_tolerance_and_sizes():
    preds, gts = make_pairs(seed=6, kind="structured", ignore=True, n=2, shape=(30, 40))
    big_preds, big_gts = make_pairs(seed=7, kind="structured", ignore=True, n=1, shape=(60, 80))
    # 0.05 * 50 = 2.5 -> 3 px on 30x40; 0.05 * 100 = 5 px on 60x80
    one_size = boundary_fscore(preds[0], gts[0], [0.05, 2], num_classes=6)
    ref = reference_boundary_fscore(preds[:1], gts[:1], 6, [0.05])
    assert one_size["tolerances_px"] == [3, 2]
    assert one_size["bf_3px"] == pytest.approx(ref[0.05][0], abs=1e-9)
    metric = BoundaryFScore(6, [0.05])
    metric.update(np.stack(preds), np.stack(gts))  # (B, H, W)
    metric.update(torch.from_numpy(big_preds[0]), torch.from_numpy(big_gts[0]))
    mixed = metric.compute()
    assert mixed["tolerances_px"] == [[3, 5]]
    ref = reference_boundary_fscore(preds + big_preds, gts + big_gts, 6, [0.05])
    assert mixed["bf_0.05"] == pytest.approx(ref[0.05][0], abs=1e-9)
    assert_same_scores(mixed["bf_per_class"][0.05], ref[0.05][1])


def test_boundary_fscore_known_answer():
    gt = np.zeros((6, 8), dtype=np.uint8)
    gt[:, 4:] = 1  # vertical edge: seg2bmap marks column 3 for both classes (6 pixels each)
    pred = np.zeros_like(gt)
    pred[:, 6:] = 1  # edge two columns to the right: boundary column 5
    out = boundary_fscore(pred, gt, [1, 2], num_classes=3)
    assert out["bf_1px"] == pytest.approx(0.0)  # 2 px apart: nothing matches at 1 px
    assert out["bf_2px"] == pytest.approx(1.0)
    assert out["bf_images_per_class"] == [1, 1, 0]  # class 2 absent: skipped
    out = boundary_fscore(pred, gt, [1], num_classes=3, absent_as_one=True)
    assert out["bf_1px"] == pytest.approx((0 + 0 + 1) / 3)
    # a class filling both maps has no boundary anywhere: present, and a perfect F = 1
    full = np.full((6, 8), 2, dtype=np.uint8)
    out = boundary_fscore(full, full, [1], num_classes=3)
    assert out["bf_images_per_class"] == [0, 0, 1]
    assert out["bf_1px"] == 1.0


def test_boundary_fscore_rejects_bad_tolerances():
    for bad in ([], [0], [-1], [2.5]):
        with pytest.raises(ConfigError):
            BoundaryFScore(3, bad)


# ----------------------------------------------------------------------------- boundary IoU


@pytest.mark.parametrize("not_evaluated", [IGNORE, 9])
def test_boundary_iou_known_answer(not_evaluated):
    gt = np.zeros((6, 6), dtype=np.uint8)
    gt[:, 3:] = 1  # boundary column 2; width 1 -> band = columns 1, 2, 3
    pred = np.zeros_like(gt)  # everything predicted as class 0
    metric = BoundaryIoU(3, width=1)
    metric.update(pred, gt)
    out = metric.compute()
    # class 0: inter = cols 1-2 (12 px), union = cols 1-3 (18 px); class 1: 0 / 6; class 2: absent
    assert out["biou_per_class"][:2] == pytest.approx([12 / 18, 0.0])
    assert math.isnan(out["biou_per_class"][2])
    assert out["biou"] == pytest.approx((12 / 18 + 0.0) / 2)
    # column 3 ignored (or holding a label outside 0..K-1): label changes at columns 2 and 3; with
    # width 0 the band is those two columns and only column 2 is evaluated
    gt_ignore = gt.copy()
    gt_ignore[:, 3] = not_evaluated
    metric = BoundaryIoU(3, width=0)
    metric.update(torch.from_numpy(pred), torch.from_numpy(gt_ignore))
    out = metric.compute()
    assert out["biou_per_class"][0] == pytest.approx(1.0)  # column 2: gt 0, pred 0
    assert math.isnan(out["biou_per_class"][1])  # column 3 ignored, so class 1 is not in the band


# ----------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, port: int, preds: list, gts: list, queue) -> None:
    torch.set_num_threads(1)  # forked child: stay off the parent's OpenMP pool (as DataLoader does)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = _metrics_for_all_reduce()
        for m in metrics:
            m.update(torch.from_numpy(preds[rank]).long(), torch.from_numpy(gts[rank]).long())
            m.all_reduce()
        if rank == 0:
            queue.put([m.compute() for m in metrics])
    finally:
        dist.destroy_process_group()


def _metrics_for_all_reduce() -> list:
    # 0.05 of the diagonal is 4 px on 40x56 and 3 px on 30x40: the radius range must be reduced too
    return [ConfusionMatrix(6), BoundaryFScore(6, [1, 0.05]), BoundaryIoU(6, width=2)]


def test_all_reduce_equals_single_process():
    preds, gts = make_pairs(seed=8, kind="blocky", ignore=True, n=1, shape=(40, 56))
    small_preds, small_gts = make_pairs(seed=9, kind="blocky", ignore=True, n=1, shape=(30, 40))
    preds, gts = preds + small_preds, gts + small_gts
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_distributed_worker, args=(r, port, preds, gts, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = queue.get(timeout=120)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    single = _metrics_for_all_reduce()
    for m in single:
        for pred, gt in zip(preds, gts):
            m.update(torch.from_numpy(pred).long(), torch.from_numpy(gt).long())
    assert got[1]["tolerances_px"] == [1, [3, 4]]
    for dist_out, m in zip(got, single):
        expected = m.compute()
        assert dist_out.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, dict):
                for r in value:
                    assert_same_scores(dist_out[key][r], value[r], tol=1e-12)
            elif isinstance(value, list) and value and isinstance(value[0], float):
                assert_same_scores(dist_out[key], value, tol=1e-12)
            else:
                assert dist_out[key] == value or (math.isnan(value) and math.isnan(dist_out[key]))

"""QC pictures (``--qc``), the explanation map (``--explain``) and the HTML index.

Pictures are checked by their pixels: overlays are painted in exact colours
(:mod:`recnec_cli.qc.figures`) and every PNG carries its panel layout (pixel boxes, the world ->
pixel mapping, label positions), so a test can say where the lesion must appear and find it there.
Studies are the phantoms of ``tests/phantoms.py`` (HD-BET replaced by the phantom's brain).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from recnec_cli import DISCLAIMER
from recnec_cli.cli.main import app
from recnec_cli.config import resolve_settings
from recnec_cli.qc import explain as explain_mod
from recnec_cli.qc.explain import occlusion_sensitivity
from recnec_cli.qc.figures import (
    BOTH_EDGES_RGB,
    BOX_RGB,
    BRAIN_RGB,
    LABEL_RGB,
    LESION_RGB,
    OEDEMA_RGB,
    T2_EDGE_RGB,
    StudySnapshot,
    read_layout,
    read_rgb,
    render_study,
    study_layout_size,
)
from recnec_cli.qc.index import write_index

import phantoms

REPO = Path(__file__).resolve().parents[1]
HOUR_AGO = time.time() - 3600
LEFT_LESION = (-35.0, 25.0, 15.0)  # patient's left (R < 0), anterior, superior: mm, RAS+
LESION_RADIUS_MM = 9.0


def _phantom(tmp: Path, name: str, lesion=LEFT_LESION, seed: int = 0) -> dict:
    """The phantom's volumes, brain and lesion masks on its own grid (which then plays the common grid)."""
    import nibabel as nib

    src = phantoms.write_phantom_study(tmp, name, lesion_ras_mm=lesion, seed=seed)
    files = {"T1": "T1w", "T2": "T2w", "T1ce": "ce-gadolinium_T1w"}
    imgs = {r: nib.load(str(src / f"{name}_{f}.nii.gz")) for r, f in files.items()}
    aff = imgs["T1ce"].affine
    xyz = phantoms._world(phantoms.SHAPE, aff)
    lesion_mask = np.sqrt(((xyz - np.reshape(lesion, (3, 1, 1, 1))) ** 2).sum(0)) <= LESION_RADIUS_MM
    return {"affine": aff, "vols": {r: np.asarray(i.dataobj, np.float32) for r, i in imgs.items()},
            "brain": phantoms.brain_ellipsoid(phantoms.SHAPE, aff), "lesion": lesion_mask, "centroid": lesion}


def _snapshot(ph: dict, **replace_vols) -> StudySnapshot:
    vols = {**ph["vols"], **replace_vols}
    return StudySnapshot(grid_affine=ph["affine"], on_grid=vols, brain=ph["brain"], lesion=ph["lesion"],
                         lesion_centroid_ras_mm=ph["centroid"], box_mm=60.0,
                         registration={"T1": {"translation_mm": 0.1, "rotation_deg": 0.1}})


def _pixels(rgb: np.ndarray, colour, box) -> np.ndarray:
    """``(n, 2)`` array of ``(x, y)`` PNG pixel positions of exactly ``colour`` inside ``box``."""
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(np.all(rgb[y0:y1, x0:x1] == np.asarray(colour, np.uint8), axis=-1))
    return np.c_[xs + x0 + 0.5, ys + y0 + 0.5]


def _panel(layout: dict, row: str, view: str) -> dict:
    (p,) = [p for p in layout["panels"] if p["row"] == row and p["view"] == view]
    return p


def _to_px(panel: dict, world) -> np.ndarray:
    return np.asarray(panel["world_to_px"]) @ np.r_[np.asarray(world, float), 1.0]


def _label_drawn(rgb: np.ndarray, xy, radius: int = 7) -> bool:
    x, y = (int(round(v)) for v in xy)
    win = rgb[y - radius:y + radius + 1, x - radius:x + radius + 1]
    return int(np.all(win == np.asarray(LABEL_RGB, np.uint8), axis=-1).sum()) >= 4


def test_lesion_overlay_lies_where_the_lesion_is_on_the_side_labelled(tmp_path):
    """A lesion in the left hemisphere (anterior, superior) is outlined where it is in every
    view, on the viewer's right in axial and coronal (radiological convention: patient's right on
    the viewer's left), next to the drawn L (and A, S) labels; mirrored to the right, it moves."""
    ph = _phantom(tmp_path, "left")
    pic = render_study(_snapshot(ph), tmp_path / "left.png", header=["h"], name="left", thumb=tmp_path / "t.png")
    rgb, layout = read_rgb(pic.path), read_layout(pic.path)
    assert layout == pic.layout and rgb.shape[:2] == tuple(layout["size_px"][::-1])
    for row in ("T1", "T2", "T1ce"):
        for view in ("axial", "coronal", "sagittal"):
            panel = _panel(layout, row, view)
            x0, y0, x1, y1 = panel["box_px"]
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            red = _pixels(rgb, LESION_RGB, panel["box_px"])
            assert len(red) > 40, (row, view)
            centre = red.mean(0)
            expected = _to_px(panel, ph["centroid"])
            assert np.abs(centre - expected).max() < 3.0, (row, view, centre, expected)
            # the ring's radius in pixels is the lesion's radius over the panel's scale
            radius = np.hypot(*(red - centre).T).max() * layout["mm_per_px"]
            assert LESION_RADIUS_MM - 3 < radius < LESION_RADIUS_MM + 3, (row, view, radius)
            lab = panel["labels"]
            assert all(_label_drawn(rgb, xy) for xy in lab.values()), (row, view, lab)
            assert len(_pixels(rgb, BRAIN_RGB, panel["box_px"])) > 200  # the brain-mask outline
            box = _pixels(rgb, BOX_RGB, panel["box_px"])  # the 60 mm model box, centred on the lesion
            side_mm = (box.max(0) - box.min(0) + 1) * layout["mm_per_px"]
            assert np.allclose(side_mm, 60.0, atol=2.5) and np.abs(box.mean(0) - expected).max() < 3.0
            if view in ("axial", "coronal"):
                assert centre[0] > cx  # patient's left = viewer's right
                assert lab["R"][0] < cx < lab["L"][0]
                assert abs(centre[0] - lab["L"][0]) < abs(centre[0] - lab["R"][0])
            else:  # sagittal: anterior on the viewer's left
                assert centre[0] < cx and lab["A"][0] < cx < lab["P"][0]
            if view == "axial":
                assert centre[1] < cy and lab["A"][1] < cy < lab["P"][1]  # anterior at the top
            else:
                assert centre[1] < cy and lab["S"][1] < cy < lab["I"][1]  # superior at the top
    # window: 0.5th percentile of the volume to the 99.5th inside the brain
    t1ce = ph["vols"]["T1ce"]
    assert layout["rows"]["T1ce"]["window"] == pytest.approx(
        [np.percentile(t1ce, 0.5), np.percentile(t1ce[ph["brain"]], 99.5)], abs=1e-2)
    thumb = read_rgb(tmp_path / "t.png")  # the index's thumbnail: the T1ce axial panel, lesion included
    assert thumb.shape == (200, 200, 3) and np.all(thumb == np.asarray(LESION_RGB, np.uint8), axis=-1).sum() > 40

    right = _phantom(tmp_path, "right", lesion=(35.0, 25.0, 15.0))
    pic_r = render_study(_snapshot(right), tmp_path / "right.png", header=["h"], name="right")
    rgb_r = read_rgb(pic_r.path)
    for view in ("axial", "coronal"):
        panel = _panel(pic_r.layout, "T1ce", view)
        x0, _, x1, _ = panel["box_px"]
        assert _pixels(rgb_r, LESION_RGB, panel["box_px"]).mean(0)[0] < (x0 + x1) / 2  # now on the viewer's left


def test_flair_gets_its_row_and_the_oedema_its_outline(tmp_path):
    """A study with a FLAIR on the common grid gets a FLAIR row between the T1ce and the
    registration check; the segmenter's T2/FLAIR hyperintensity (a 9-15 mm shell around the
    lesion here) is outlined in violet where it is, on every anatomical row. Without a FLAIR the
    picture keeps its four rows, the oedema outline included; a NO_ENHANCING_LESION study's
    snapshot carries all of the segmenter's oedema."""
    from recnec_cli.orchestration.pipeline import snapshot_of

    ph = _phantom(tmp_path, "fl")
    xyz = phantoms._world(phantoms.SHAPE, ph["affine"])
    r = np.sqrt(((xyz - np.reshape(ph["centroid"], (3, 1, 1, 1))) ** 2).sum(0))
    oedema = (r > LESION_RADIUS_MM) & (r <= 15.0)
    flair = ph["vols"]["T2"] + 200.0 * oedema
    snap = _snapshot(ph, FLAIR=flair)
    snap.oedema = oedema
    pic = render_study(snap, tmp_path / "fl.png", header=["h"], name="fl")
    rgb, layout = read_rgb(pic.path), read_layout(pic.path)
    assert rgb.shape[:2] == study_layout_size(5)[::-1] and layout["rows"]["FLAIR"]["source"].startswith("registered")
    boxes = {row: _panel(layout, row, "axial")["box_px"] for row in ("T1ce", "FLAIR", "registration")}
    assert boxes["T1ce"][1] < boxes["FLAIR"][1] < boxes["registration"][1]
    for row in ("T1", "T2", "T1ce", "FLAIR"):
        for view in ("axial", "coronal"):
            panel = _panel(layout, row, view)
            violet = _pixels(rgb, OEDEMA_RGB, panel["box_px"])
            assert len(violet) > 40, (row, view)
            radius = np.hypot(*(violet - _to_px(panel, ph["centroid"])).T) * layout["mm_per_px"]
            assert np.median(radius) == pytest.approx(15.0, abs=2.5), (row, view)  # the outer edge
    assert len(_pixels(rgb, OEDEMA_RGB, boxes["registration"])) == 0  # edges only there

    four = render_study(_snapshot(ph), tmp_path / "no_flair.png", header=["h"], name="nf")
    assert "FLAIR" not in four.layout["rows"] and read_rgb(four.path).shape[:2] == study_layout_size(4)[::-1]

    labels = np.zeros(phantoms.SHAPE, np.uint8)
    labels[oedema] = 3
    ctx = SimpleNamespace(volumes={}, grid_affine=ph["affine"], on_grid={}, brain=ph["brain"], registration={},
                          lesion=None, lesion_labels=None, segmentation=SimpleNamespace(labels=labels))
    assert np.array_equal(snapshot_of(ctx).oedema, oedema)


def test_long_header_lines_shrink_to_fit_instead_of_being_clipped(tmp_path):
    """A DICOM study's header (64-character UID, three roles, lesion) is wider than the picture at
    the normal font: it is drawn smaller, and ends before the right edge (the fresh-user trial found
    it cut off at "roles: T1 = series 106 (0.7")."""
    from recnec_cli.qc.figures import BACKGROUND_RGB, HEADER_PX, stamp_result

    ph = _phantom(tmp_path, "left")
    uid = "2.25." + "1234567890" * 6
    long1 = (f"recnec QC · study {uid} · patient 9f3c1a2b4d5e6f70 · roles: T1 = series 106 (0.71), "
             "T2 = series 205 (0.95), T1ce = series 307 (0.90) · lesion 18.45 mL (auto)")
    pic = render_study(_snapshot(ph), tmp_path / "long.png", header=[long1, "status OK: awaiting inference"],
                       name="long")
    stamp_result(pic.path, "p(recurrence) 0.604 · ensemble spread 0.210 · label recurrence at threshold 0.519 "
                 "· research use only · " + "x" * 80)
    band = read_rgb(pic.path)[:HEADER_PX]
    text_cols = np.where(np.any(np.abs(band.astype(int) - np.asarray(BACKGROUND_RGB)).sum(-1) > 60, axis=0))[0]
    assert text_cols.size and text_cols.max() < band.shape[1] - 8, (text_cols.max(), band.shape[1])
    assert text_cols.max() > band.shape[1] * 0.8  # still as wide as it can be: shrunk, not dropped


def test_registration_picture_shows_a_shifted_t2(tmp_path):
    """T2 edges over the T1ce: aligned, they coincide with the T1's (orange); a T2 shifted 10 mm
    towards the patient's right on purpose draws its own contours 10 mm further to the viewer's
    left in the axial and coronal views (radiological convention), and the coincidences go."""
    ph = _phantom(tmp_path, "reg")
    shifted = np.zeros_like(ph["vols"]["T2"])
    shifted[4:] = ph["vols"]["T2"][:-4]  # 4 voxels of 2.5 mm towards the patient's right (+R)
    a = render_study(_snapshot(ph), tmp_path / "aligned.png", header=["h"], name="a")
    b = render_study(_snapshot(ph, T2=shifted), tmp_path / "shifted.png", header=["h"], name="b")
    ra, rb = read_rgb(a.path), read_rgb(b.path)
    shift_px = 10.0 / a.layout["mm_per_px"]
    for view, axis, sign in (("axial", 0, -1), ("coronal", 0, -1)):
        pa, pb = _panel(a.layout, "registration", view), _panel(b.layout, "registration", view)
        both_a = len(_pixels(ra, BOTH_EDGES_RGB, pa["box_px"]))
        both_b = len(_pixels(rb, BOTH_EDGES_RGB, pb["box_px"]))
        assert both_a > 2.5 * both_b, (view, both_a, both_b)
        t2_a = np.r_[_pixels(ra, T2_EDGE_RGB, pa["box_px"]), _pixels(ra, BOTH_EDGES_RGB, pa["box_px"])].mean(0)
        t2_b = np.r_[_pixels(rb, T2_EDGE_RGB, pb["box_px"]), _pixels(rb, BOTH_EDGES_RGB, pb["box_px"])].mean(0)
        moved = (t2_b - t2_a)[axis] * sign
        assert 0.6 * shift_px < moved < 1.4 * shift_px, (view, moved, shift_px)
        assert abs((t2_b - t2_a)[1 - axis]) < 0.3 * shift_px
    counts_a = a.layout["rows"]["registration"]["edge_pixels"]["axial"]
    counts_b = b.layout["rows"]["registration"]["edge_pixels"]["axial"]
    assert counts_a["both"] > 2.5 * counts_b["both"]  # the layout records what the pixels show


class _LooksAtOneCube:
    """A stand-in ensemble whose p(recurrence) reads only the T1ce in one cube of the box."""

    spec = SimpleNamespace(channels=("T1", "T2", "T1ce"), spacing_mm=1.5, size_vox=(40, 40, 40))
    n_models = 1
    threshold = 0.5

    def predict(self, x, **_kw):
        m = np.asarray(x)[:, 2, 5:15, 25:35, 20:30].mean(axis=(1, 2, 3))
        return SimpleNamespace(mean=1.0 / (1.0 + np.exp(-m)))


def test_occlusion_map_finds_what_the_model_reads_and_runs_through_the_onnx_ensemble():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.3, (3, 40, 40, 40)).astype(np.float32)
    x[2, 5:15, 25:35, 20:30] += 2.0
    occ = occlusion_sensitivity(_LooksAtOneCube(), x)
    assert occ.delta.shape == (40, 40, 40) and occ.passes == 7 ** 3
    peak = np.unravel_index(np.argmax(occ.delta), occ.delta.shape)
    assert 5 <= peak[0] < 15 and 25 <= peak[1] < 35 and 20 <= peak[2] < 30, peak
    assert occ.delta[5:15, 25:35, 20:30].mean() > 0.05  # hiding the evidence lowers p
    assert np.all(occ.delta[25:, :15, :10] == 0.0)  # cubes that never touch it change nothing
    # the shipped ONNX ensemble, coarse cubes: p is the ensemble's own, the map is finite
    from recnec_cli.stages.infer import Ensemble

    ens = Ensemble.load(REPO / "weights", device="cpu", threads=1)
    occ = occlusion_sensitivity(ens, x, patch_vox=20, stride_vox=20)
    assert occ.passes == 8 and np.isfinite(occ.delta).all()
    # in the report's units: the calibrated probability
    assert occ.p == pytest.approx(float(ens.predict(x[None]).probability[0]), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the scan
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qc_scan(tmp_path_factory):
    """One scan with --qc and --explain over four phantom studies: a left lesion in a folder
    named after a patient (OK), a right lesion (OK), one whose registration fails, one without T2
    (MISSING_ROLE). Explanation cubes are coarse (20 voxels) to keep it fast."""
    from recnec_cli.errors import RegistrationError
    from recnec_cli.stages import register, skullstrip

    root = tmp_path_factory.mktemp("qcscan")
    studies = root / "studies"
    phantoms.write_phantom_study(studies, "Doe_Jane", lesion_ras_mm=LEFT_LESION, seed=1)
    phantoms.write_phantom_study(studies, "sub-01", lesion_ras_mm=(30.0, 10.0, 5.0), seed=2)
    phantoms.write_phantom_study(studies, "sub-02", lesion_ras_mm=(20.0, -10.0, 0.0), seed=3)
    phantoms.write_phantom_study(studies, "sub-03", lesion_ras_mm=(-20.0, 0.0, 0.0), seed=4)
    for f in (studies / "sub-03").glob("*T2w*"):
        f.unlink()
    for p in studies.rglob("*"):
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    real_register = register.register_rigid

    def failing_for_sub02(fixed, moving, **kw):
        if "sub-02" in moving.series_id:
            raise RegistrationError("rigid registration failed its same-session check (test)")
        return real_register(fixed, moving, **kw)

    qc = root / "qc"
    out = root / "out" / "r.csv"
    with pytest.MonkeyPatch.context() as mp:
        fake = phantoms.FakeHdBet()
        mp.setattr(skullstrip, "get_hdbet", lambda **kw: fake)
        mp.setattr(register, "register_rigid", failing_for_sub02)
        mp.setattr(explain_mod, "PATCH_VOX", 20)
        mp.setattr(explain_mod, "STRIDE_VOX", 20)
        res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out), "--grid-spacing", "2", "--threads", "1",
                                       "--qc", str(qc), "--explain", "--quiet"])
    with open(out, newline="") as fh:
        rows = {r["study_id"]: r for r in csv.DictReader(fh)}
    return SimpleNamespace(res=res, rows=rows, qc=qc, out=out, studies=studies)


def test_scan_writes_pictures_named_by_pseudonym_with_the_result(qc_scan):
    assert qc_scan.res.exit_code == 1, qc_scan.res.output
    rows, qc = qc_scan.rows, qc_scan.qc
    assert {k: r["status"] for k, r in rows.items()} == {
        "Doe_Jane": "OK", "sub-01": "OK", "sub-02": "REGISTRATION_FAILED", "sub-03": "MISSING_ROLE"}
    names = sorted(p.name for p in qc.iterdir())
    assert all(re.fullmatch(r"study-[0-9a-f]{16}(\.thumb|\.explain)?\.png|index\.html", n) for n in names), names
    for p in qc.glob("*.png"):  # no folder name in file names or in the pictures' text
        assert "Doe" not in p.name
        if not p.name.endswith(".thumb.png"):
            assert "Doe" not in json.dumps(read_layout(p))
    ok = rows["Doe_Jane"]
    assert ok["qc_png"] and ok["explain_png"] and float(ok["seconds_explain"]) > 0 and float(ok["seconds_qc"]) > 0
    layout = read_layout(qc / ok["qc_png"])
    # the header carries the result the report has (stamped after inference)
    assert layout["header"][1].startswith(f"p(recurrence) {float(ok['p_recurrence']):.3f}")
    assert f"label {ok['label']}" in layout["header"][1] and "patient -" in layout["header"][0]
    assert "roles: T1 (0." in layout["header"][0] and f"lesion {float(ok['lesion_volume_ml']):.2f} mL" in layout[
        "header"][0]
    # the lesion's confidence as the report has it, LOW when the row is flagged (fresh-user trial)
    conf = float(ok["lesion_confidence"])
    assert f"confidence {conf:.2f}" in layout["header"][0]
    assert (" LOW)" in layout["header"][0]) == ("LESION_LOW_CONFIDENCE" in ok["flags"])
    # the offsets printed beside the registration row are the report's
    assert layout["registration"]["T2"]["translation_mm"] == float(ok["t2_reg_translation_mm"])
    assert layout["registration"]["T1"]["rotation_deg"] == float(ok["t1_reg_rotation_deg"])
    # through the whole pipeline, the left lesion is drawn where the report says it is, on the viewer's right
    rgb = read_rgb(qc / ok["qc_png"])
    centroid = [float(ok[k]) for k in ("lesion_r_mm", "lesion_a_mm", "lesion_s_mm")]
    assert centroid[0] < 0
    for view in ("axial", "coronal"):
        panel = _panel(layout, "T1ce", view)
        red = _pixels(rgb, LESION_RGB, panel["box_px"])
        x0, _, x1, _ = panel["box_px"]
        assert len(red) > 20 and red.mean(0)[0] > (x0 + x1) / 2
        assert np.abs(red.mean(0) - _to_px(panel, centroid)).max() < 4.0
    ex = read_layout(qc / ok["explain_png"])
    assert ex["kind"] == "explanation" and len(ex["panels"]) == 6
    assert any("8 ensemble passes" in n for n in ex["notes"])


def test_failed_studies_get_what_their_stages_allow(qc_scan):
    rows, qc = qc_scan.rows, qc_scan.qc
    reg = rows["sub-02"]
    layout = read_layout(qc / reg["qc_png"])
    assert "REGISTRATION_FAILED" in layout["header"][1]
    assert layout["rows"]["T1ce"]["source"] == "on the common grid"
    assert layout["rows"]["T1"]["source"].startswith("NOT registered")  # shown in scanner alignment, and said so
    assert layout["lesion_centroid_ras_mm"] is None
    rgb = read_rgb(qc / reg["qc_png"])
    t1ce = _panel(layout, "T1ce", "axial")
    x0, y0, x1, y1 = t1ce["box_px"]
    assert (rgb[y0:y1, x0:x1].astype(int).sum(-1) > 300).mean() > 0.2  # the T1ce is there
    for panel in layout["panels"]:  # no lesion outline: the lesion stage never ran
        assert len(_pixels(rgb, LESION_RGB, panel["box_px"])) == 0
    assert reg["explain_png"] == ""
    assert rows["sub-03"]["qc_png"] == ""  # failed at classification: no pixels to show


def test_index_heading_counts_studies_in_english(tmp_path):
    one = write_index(tmp_path / "one", [{"study_id": "sub-a", "status": "OK"}]).read_text(encoding="utf-8")
    two = write_index(tmp_path / "two", [{"study_id": "sub-a", "status": "OK"},
                                         {"study_id": "sub-b", "status": "OK"}]).read_text(encoding="utf-8")
    assert "QC overview of 1 study</h1>" in one and "QC overview of 2 studies</h1>" in two


def test_index_lists_every_study_from_the_state(qc_scan):
    qc = qc_scan.qc
    html = (qc / "index.html").read_text(encoding="utf-8")
    assert html.count('<tr class="study') == 4 and DISCLAIMER in html and "of 4 studies" in html
    assert "REGISTRATION_FAILED" in html and "MISSING_ROLE" in html and "no picture" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from outside
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert (qc / ref).is_file(), ref
    # rebuilt from the nightly state alone
    (qc / "index.html").unlink()
    state = qc_scan.out.with_name("r.state.sqlite")
    res = CliRunner().invoke(app, ["status", "--state", str(state), "--qc", str(qc), "--format", "json"])
    assert res.exit_code == 0, res.output
    again = (qc / "index.html").read_text(encoding="utf-8")
    assert again.count('<tr class="study') == 4 and re.findall(r'src="([^"]+)"', again) == re.findall(
        r'src="([^"]+)"', html)


def test_unchanged_rerun_keeps_pictures_and_clears_killed_writes(qc_scan):
    """A nightly re-run over the same tree: nothing is reprocessed, the pictures stay as they
    were, the index is rebuilt from the state, and a temporary left by a killed write is removed."""
    qc = qc_scan.qc
    before = {p.name: p.stat().st_mtime_ns for p in qc.glob("*.png")}
    (qc / ".study-0000000000000000.png.abc123.tmp").write_bytes(b"half a picture")
    res = CliRunner().invoke(app, ["scan", str(qc_scan.studies), "--out", str(qc_scan.out), "--grid-spacing", "2",
                                   "--threads", "1", "--qc", str(qc), "--quiet"])
    assert res.exit_code == 1 and "processed 0, unchanged 4" in res.output, res.output
    assert {p.name: p.stat().st_mtime_ns for p in qc.glob("*.png")} == before
    assert not list(qc.glob(".*.tmp"))
    html = (qc / "index.html").read_text(encoding="utf-8")
    assert html.count('<tr class="study') == 4 and html.count('class="thumb"') == 3


def test_a_picture_that_cannot_be_drawn_never_changes_the_row(tmp_path, monkeypatch, caplog):
    from recnec_cli.orchestration import pipeline
    from recnec_cli.qc import figures
    from recnec_cli.study import Study

    def broken(*a, **k):
        raise MemoryError("no memory for the picture")

    monkeypatch.setattr(figures, "render_study", broken)
    settings = resolve_settings({"qc_dir": tmp_path / "qc"})
    r = pipeline.StudyResult(study=Study("1.2.3", "abc", "dicom", "", ()))
    with caplog.at_level("WARNING"):
        pipeline._draw_study_picture(r, StudySnapshot(), settings=settings, qc_name=None)
    assert r.ok and r.qc == {"name": "1.2.3"}
    assert "QC picture not drawn (MemoryError)" in caplog.text
    r.qc["png"] = "1.2.3.png"  # a picture that is not there: stamping it fails, the row stays
    pipeline.finish_qc(r, ensemble=SimpleNamespace(threshold=0.5), settings=settings)
    assert r.ok and "QC result line not drawn" in caplog.text


def test_qc_options_get_the_same_guard_from_cli_and_environment(tmp_path, monkeypatch):
    studies = tmp_path / "studies"
    phantoms.write_phantom_study(studies, "sub-00")
    out = str(tmp_path / "r.csv")
    runner = CliRunner()
    res = runner.invoke(app, ["scan", str(studies), "--out", out, "--qc", str(studies / "qc")])
    assert res.exit_code == 2 and "--qc" in res.output and "inside the input tree" in res.output
    res = runner.invoke(app, ["scan", str(studies), "--out", out, "--explain"])
    assert res.exit_code == 2 and "needs a QC folder" in res.output
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["scan", str(studies), "--out", out, "--qc", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file" in res.output
    monkeypatch.setenv("RECNEC_QC_DIR", str(studies / "qc"))
    res = runner.invoke(app, ["scan", str(studies), "--out", out])
    assert res.exit_code == 2 and "RECNEC_QC_DIR (environment)" in res.output and "inside the input tree" in res.output
    monkeypatch.delenv("RECNEC_QC_DIR")
    monkeypatch.setenv("RECNEC_EXPLAIN", "1")
    res = runner.invoke(app, ["scan", str(studies), "--out", out])
    assert res.exit_code == 2 and "RECNEC_EXPLAIN (environment)" in res.output
    monkeypatch.setenv("RECNEC_QC_DIR", str(tmp_path / "qc"))
    s = resolve_settings()
    assert s.explain and s.qc_dir == tmp_path / "qc" and s.sources["qc_dir"] == "env"
    assert not (studies / "qc").exists() and not Path(out).exists()


# ---------------------------------------------------------------------------------------------
# the index in a real browser
# ---------------------------------------------------------------------------------------------
def _browser():
    """A headless Chromium through Selenium, or a skip with the reason."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install '.[test]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("headless browser test needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    import tempfile

    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="recnec-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_bin), options=opts), profile


@pytest.mark.slow  # drives a headless Chromium
def test_index_renders_sorts_and_filters_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    qc = tmp_path / "qc"
    ph_l, ph_r = _phantom(tmp_path, "l"), _phantom(tmp_path, "r", lesion=(30.0, -10.0, 5.0), seed=1)
    render_study(_snapshot(ph_l), qc / "study-aaaa.png", header=["recnec QC · study study-aaaa", "p 0.82"],
                 name="study-aaaa", thumb=qc / "study-aaaa.thumb.png")
    render_study(_snapshot(ph_r), qc / "study-bbbb.png", header=["recnec QC · study study-bbbb", "p 0.12"],
                 name="study-bbbb", thumb=qc / "study-bbbb.thumb.png")
    base = {"patient_pseudonym": "0f3c9a1e2b7d4c55", "processed_utc": "2026-12-02T01:30:00+00:00"}
    rows = [
        {**base, "study_id": "sub-a", "status": "OK", "p_recurrence": 0.82, "ensemble_spread": 0.05,
         "label": "recurrence", "lesion_volume_ml": 3.1, "lesion_source": "segmenter", "qc_png": "study-aaaa.png",
         "lesion_confidence": 0.91, "flags": ""},
        {**base, "study_id": "sub-b", "status": "OK", "p_recurrence": 0.12, "ensemble_spread": 0.02,
         "label": "necrosis", "lesion_volume_ml": 1.4, "lesion_source": "user", "qc_png": "study-bbbb.png"},
        {**base, "study_id": "sub-c", "status": "OK", "p_recurrence": 0.55, "ensemble_spread": 0.11,
         "label": "recurrence", "lesion_volume_ml": 7.9, "lesion_source": "segmenter",
         "lesion_confidence": 0.31, "flags": "LESION_AMBIGUOUS LESION_LOW_CONFIDENCE"},
        {**base, "study_id": "sub-d", "status": "REGISTRATION_FAILED", "error_code": "REGISTRATION_FAILED",
         "failed_stage": "register", "error_message": "T2 onto T1ce: rigid registration failed <check>"},
        {**base, "study_id": "sub-e", "status": "MISSING_ROLE", "error_code": "MISSING_ROLE",
         "failed_stage": "classify", "error_message": "T2; found: T1, T1ce", "present_in_tree": "no"},
    ]
    index = write_index(qc, rows, title="recnec scan: r.csv")
    driver, profile = _browser()
    try:
        driver.set_page_load_timeout(30)
        driver.get(index.resolve().as_uri())
        body_rows = driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr")
        assert len(body_rows) == 5
        assert driver.find_element(By.ID, "disclaimer").text.startswith("RESEARCH USE ONLY")
        loaded = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);")
        assert loaded == [True, True]  # the two thumbnails, from relative links
        assert "&lt;check&gt;" in driver.page_source  # error text escaped, not markup
        assert "no longer in the tree" in body_rows[4].text

        def p_column() -> list[str]:
            return [r.find_element(By.CSS_SELECTOR, "td.p").text for r in
                    driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr")]

        driver.find_element(By.ID, "sort-p").click()
        assert p_column() == ["0.120", "0.550", "0.820", "", ""]  # ascending, studies without p last
        driver.find_element(By.ID, "sort-p").click()
        assert p_column() == ["0.820", "0.550", "0.120", "", ""]
        driver.save_screenshot(str(tmp_path / "index_sorted.png"))
        keep = os.environ.get("RECNEC_TEST_ARTIFACTS")
        if keep:  # for people who want to look at it
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "index_sorted.png", Path(keep) / "index_sorted.png")
        rect = driver.execute_script(
            "const r = document.images[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom, "
            "window.devicePixelRatio];")
        Select(driver.find_element(By.ID, "filter-status")).select_by_value("__failed__")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr") if r.is_displayed()]
        assert len(visible) == 2 and "showing 2 of 5" in driver.find_element(By.ID, "shown").text
        Select(driver.find_element(By.ID, "filter-status")).select_by_value("")
        Select(driver.find_element(By.ID, "filter-label")).select_by_value("recurrence")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr") if r.is_displayed()]
        assert [r.find_element(By.CSS_SELECTOR, "td.p").text for r in visible] == ["0.820", "0.550"]
        Select(driver.find_element(By.ID, "filter-label")).select_by_value("")
        Select(driver.find_element(By.ID, "filter-confidence")).select_by_value("low")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr") if r.is_displayed()]
        assert [r.find_element(By.CSS_SELECTOR, "td.id").text for r in visible] == ["sub-c"]
        assert visible[0].find_element(By.CSS_SELECTOR, "td.lowconf").text == "0.31"
        Select(driver.find_element(By.ID, "filter-confidence")).select_by_value("ok")
        visible = [r for r in driver.find_elements(By.CSS_SELECTOR, "#studies tbody tr") if r.is_displayed()]
        assert [r.find_element(By.CSS_SELECTOR, "td.id").text for r in visible] == ["sub-a"]
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    shot = read_rgb(tmp_path / "index_sorted.png")
    assert shot.shape[0] > 400 and shot.shape[1] > 800
    # the first thumbnail (the highest p after sorting: sub-a's picture) is painted where the page put it
    x0, y0, x1, y1 = (int(round(v * rect[4])) for v in rect[:4])
    thumb = shot[y0 + 2:y1 - 2, x0 + 2:x1 - 2].astype(int)
    assert thumb.shape[0] > 80 and thumb.mean() < 200  # a dark MR panel, not the page's white
    r, g, b = thumb[..., 0], thumb[..., 1], thumb[..., 2]
    assert ((r > 150) & (g < 100) & (b < 100)).sum() >= 5  # its red lesion outline, scaled by the browser

"""CTHarmonization logic on real MRML nodes (slicer-core): geometry, attributes, cancel, bad input."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is needed for the Slicer module tests")

import vtk  # noqa: E402
from slicer_helpers import (  # noqa: E402
    DEFAULT_MODEL_KERNELS,
    V1_MODEL_PATH,
    FolderDicomDatabase,
    add_volume,
    body_phantom,
    matrix,
    matrix_array,
    node_from_ct_volume,
    voxels_of,
)

from CTHarmonization.CTHarmonizationLib import logic  # noqa: E402
from TextureStarGANCore.volume_io import read_volume  # noqa: E402


def oblique_ijk_to_ras() -> np.ndarray:
    """A rotated, shifted, anisotropic IJK-to-RAS (10 degrees about S, slices tilted 12 degrees)."""
    a, t = np.radians(10), np.radians(12)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    m = np.eye(4)
    m[:3, :3] = (np.diag([-1, -1, 1]) @ rz @ rx) * np.array([0.7, 0.75, 2.5])[None, :]
    m[:3, 3] = (12.5, -40.0, 101.25)
    return m


def count_volumes(scene) -> int:
    return scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode")


def test_output_has_input_geometry_attributes_and_input_is_untouched(scene, model_path):
    voxels = body_phantom(slices=6, size=96)
    node = add_volume(scene, voxels, ijk_to_ras=oblique_ijk_to_ras(), name="Chest")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = np.eye(4)
    shift[:3, 3] = (5, -3, 7)
    transform.SetMatrixTransformToParent(matrix(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    before_mtime = node.GetImageData().GetMTime()
    seen = []

    out = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                    progressCallback=lambda d, t: seen.append((d, t)), allowUntrained=True)

    assert out.GetID() != node.GetID() and out.IsA("vtkMRMLScalarVolumeNode")
    assert "B30f" in out.GetName()
    m_in, m_out = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m_in)
    out.GetIJKToRASMatrix(m_out)
    np.testing.assert_allclose(matrix_array(m_out), matrix_array(m_in), atol=1e-9)
    np.testing.assert_allclose(matrix_array(m_out), oblique_ijk_to_ras(), atol=1e-9)
    assert out.GetTransformNodeID() == transform.GetID()
    assert out.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    # Input voxels bit-identical and the image never modified.
    np.testing.assert_array_equal(voxels_of(node), voxels)
    assert node.GetImageData().GetMTime() == before_mtime
    result = voxels_of(out)
    assert result.dtype == voxels.dtype and result.shape == voxels.shape
    assert not np.array_equal(result, voxels)  # the generator changed the body
    assert seen and seen[-1] == (6, 6)
    attrs = {k: out.GetAttribute("CTHarmonization." + k) for k in
             ("ModelFile", "ModelCardVersion", "SourceKernel", "TargetKernel", "SourceKernelFrom", "Device",
              "Method")}
    assert attrs == {"ModelFile": str(model_path), "ModelCardVersion": "1", "SourceKernel": "BONE",
                     "TargetKernel": "B30f", "SourceKernelFrom": "chosen", "Device": "cpu", "Method": "model"}
    # Same window/level as the input, so before/after are shown alike.
    assert out.GetDisplayNode().GetWindow() == pytest.approx(node.GetDisplayNode().GetWindow())


def test_existing_output_node_is_filled_and_a_rerun_is_deterministic(scene, model_path):
    node = add_volume(scene, body_phantom(slices=4, size=64))
    target = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    out = logic.harmonizeVolumeNode(node, "STANDARD", sourceKernel="B30f", modelPath=model_path,
                                    device="cpu", outputNode=target, allowUntrained=True)
    assert out is target and out.GetName() == "my output"
    first = voxels_of(out)
    again = logic.harmonizeVolumeNode(node, "STANDARD", sourceKernel="B30f", modelPath=model_path,
                                      device="cpu", allowUntrained=True)
    np.testing.assert_array_equal(voxels_of(again), first)


def test_reference_volume_gives_reference_guided_style(scene, model_path):
    node = add_volume(scene, body_phantom(slices=4, size=64, seed=0), name="input")
    reference = add_volume(scene, body_phantom(slices=6, size=64, seed=5), name="B30f scan")
    plain = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                      allowUntrained=True)
    guided = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                       referenceNode=reference, allowUntrained=True)
    assert plain.GetAttribute("CTHarmonization.Style") == "domain"
    assert guided.GetAttribute("CTHarmonization.Style") == "reference"
    assert guided.GetAttribute("CTHarmonization.ReferenceVolume") == "B30f scan"
    assert not np.array_equal(voxels_of(plain), voxels_of(guided))
    with pytest.raises(logic.HarmonizationInputError, match="reference volume is the input itself"):
        logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                  referenceNode=node, allowUntrained=True)


def test_cancel_before_and_during_the_run_leaves_no_node(scene, model_path):
    node = add_volume(scene, body_phantom(slices=6, size=64))
    voxels = voxels_of(node)
    n_before = count_volumes(scene)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(logic.HarmonizationCancelled):
        logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                  cancelEvent=cancel, allowUntrained=True)
    assert count_volumes(scene) == n_before

    # Mid-run: two slices per batch, cancel from the progress callback after the first batch.
    harmonizer = logic.getHarmonizer(logic.loadModel(model_path), "cpu")
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        cancel.set()

    existing = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "previous result")
    original_batch = harmonizer.batch_size
    harmonizer.batch_size = 2
    try:
        with pytest.raises(logic.HarmonizationCancelled):
            logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                      outputNode=existing, progressCallback=progress, cancelEvent=cancel,
                                      allowUntrained=True)
    finally:
        harmonizer.batch_size = original_batch
    assert calls == [2]
    assert count_volumes(scene) == n_before + 1  # only the node created above
    assert existing.GetImageData() is None  # the chosen output was not half-filled
    np.testing.assert_array_equal(voxels_of(node), voxels)


def test_prepared_job_runs_without_mrml_and_feeds_the_progress_tracker(scene, model_path):
    node = add_volume(scene, body_phantom(slices=4, size=64))
    job = logic.prepareHarmonization(node, "B30f", "BONE", model_path, "cpu", allowUntrained=True)
    tracker = logic.ProgressTracker()
    job.run(tracker)
    assert tracker.snapshot()[:2] == (4, 4)
    out = logic.finishHarmonization(job, scene)
    assert out.GetAttribute("CTHarmonization.TargetKernel") == "B30f"


def test_progress_tracker_estimates_time_left():
    now = [100.0]
    tracker = logic.ProgressTracker(clock=lambda: now[0])
    assert tracker.snapshot()[3] is None
    now[0] = 110.0
    tracker(25, 100)
    done, total, elapsed, left = tracker.snapshot()
    assert (done, total, elapsed) == (25, 100, 10.0) and left == pytest.approx(30.0)
    assert tracker.statusText() == "25 / 100 slices, about 0:30 left"


# --------------------------------------------------------------------------------------------------
# Source kernel from DICOM (real files)
# --------------------------------------------------------------------------------------------------
def test_source_kernel_detected_from_dicom_database(scene, model_path, ct_small_path):
    db = FolderDicomDatabase([ct_small_path])
    node = add_volume(scene, body_phantom(slices=4, size=64))
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    assert logic.dicomTagsOfNode(node, db)["ConvolutionKernel"] == "STANDARD"
    out = logic.harmonizeVolumeNode(node, "B30f", modelPath=model_path, device="cpu", dicomDatabase=db,
                                    allowUntrained=True)
    assert out.GetAttribute("CTHarmonization.SourceKernel") == "STANDARD"
    assert out.GetAttribute("CTHarmonization.SourceKernelFrom") == "DICOM"


def test_real_series_with_unknown_kernel_then_chosen_source(scene, model_path, real_ct_dir):
    files = sorted(real_ct_dir.glob("*.dcm"))
    db = FolderDicomDatabase(files)
    volume = read_volume(real_ct_dir)
    node = node_from_ct_volume(scene, volume, name="GE head")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    n = count_volumes(scene)
    with pytest.raises(logic.HarmonizationInputError, match=r"STD\+.*not one this model knows.*Choose"):
        logic.harmonizeVolumeNode(node, "B30f", modelPath=model_path, device="cpu", dicomDatabase=db,
                                  allowUntrained=True)
    assert count_volumes(scene) == n
    # The user picks the closest kernel; the tilted real geometry is kept exactly.
    out = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="STANDARD", modelPath=model_path,
                                    device="cpu", dicomDatabase=db, allowUntrained=True)
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(a)
    out.GetIJKToRASMatrix(b)
    np.testing.assert_allclose(matrix_array(b), matrix_array(a), atol=1e-9)
    assert voxels_of(out).shape == (28, 512, 512)


# --------------------------------------------------------------------------------------------------
# Bad input: clear message, nothing added, input unchanged
# --------------------------------------------------------------------------------------------------
def _expect_refusal(scene, node, pattern, model_path, **kwargs):
    n = count_volumes(scene)
    kwargs.setdefault("sourceKernel", "BONE")
    with pytest.raises(logic.HarmonizationInputError, match=pattern):
        logic.harmonizeVolumeNode(node, kwargs.pop("target", "B30f"), modelPath=model_path, device="cpu",
                                  allowUntrained=kwargs.pop("allowUntrained", True), **kwargs)
    assert count_volumes(scene) == n


def test_label_map_segmentation_and_vector_volumes_are_refused(scene, model_path):
    label = add_volume(scene, (body_phantom(4, 64) > 0).astype(np.uint8),
                       class_name="vtkMRMLLabelMapVolumeNode", name="mask")
    _expect_refusal(scene, label, "label map.*Select the CT volume", model_path)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    _expect_refusal(scene, segmentation, "segmentation, not an image", model_path)
    rgb = add_volume(scene, np.zeros((4, 64, 64, 3), np.uint8), class_name="vtkMRMLVectorVolumeNode",
                     name="photo")
    _expect_refusal(scene, rgb, "vector/colour volume.*Vector to Scalar Volume", model_path)
    _expect_refusal(scene, None, "No input volume is selected", model_path)


def test_2d_and_4d_volumes_are_refused(scene, model_path):
    flat = add_volume(scene, body_phantom(1, 64), name="one slice")
    _expect_refusal(scene, flat, "2D image.*load the whole series", model_path)
    multi = add_volume(scene, body_phantom(4, 64), name="perfusion")
    multi.SetAttribute("MultiVolume.NumberOfFrames", "20")
    _expect_refusal(scene, multi, "4D multi-volume", model_path)
    # A time point shown by a sequence browser (proxy node of a 4D sequence).
    proxy = add_volume(scene, body_phantom(4, 64), name="4D CT")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "4D CT sequence")
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "4D CT browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(proxy, sequence, False)
    _expect_refusal(scene, proxy, "time point of a 4D sequence", model_path)


def test_non_linear_transform_and_non_axial_volumes_are_refused(scene, model_path):
    node = add_volume(scene, body_phantom(4, 64))
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    node.SetAndObserveTransformNodeID(grid.GetID())
    _expect_refusal(scene, node, "non-linear.*Harden the transform", model_path)
    sagittal = np.zeros((4, 4))
    sagittal[:3, :3] = [[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]]  # slices stacked along R
    sagittal[3, 3] = 1
    side = add_volume(scene, body_phantom(4, 64), ijk_to_ras=sagittal, name="sagittal")
    _expect_refusal(scene, side, "not stored as axial slices", model_path)


def test_missing_dicom_unknown_kernel_same_kernel_and_untrained_model(scene, model_path):
    node = add_volume(scene, body_phantom(4, 64))
    _expect_refusal(scene, node, "no DICOM information.*Choose the source kernel", model_path,
                    sourceKernel=None)
    _expect_refusal(scene, node, "Target kernel: unknown domain 'B45f'.*B30f.*BONE.*STANDARD", model_path,
                    target="B45f")
    _expect_refusal(scene, node, "Source kernel: unknown domain", model_path, sourceKernel="FC13")
    _expect_refusal(scene, node, "already has the target kernel", model_path, sourceKernel="B30f")
    _expect_refusal(scene, node, "untrained.*Choose a trained model", model_path, allowUntrained=False)
    _expect_refusal(scene, node, "not found", model_path.parent / "missing.safetensors")
    _expect_refusal(scene, node, "output volume is the input", model_path, outputNode=node)


def test_values_that_are_not_ct_are_refused(scene, model_path):
    mr = add_volume(scene, np.random.default_rng(0).integers(0, 800, (4, 64, 64)).astype(np.int16), name="MR")
    _expect_refusal(scene, mr, "does not look like CT", model_path)


def test_out_of_gpu_memory_suggests_cpu(scene, model_path, monkeypatch):
    torch = pytest.importorskip("torch")
    node = add_volume(scene, body_phantom(4, 64))
    harmonizer = logic.getHarmonizer(logic.loadModel(model_path), "cpu")

    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(harmonizer, "harmonize", exhausted)
    n = count_volumes(scene)
    with pytest.raises(logic.HarmonizationOutOfMemoryError, match="run on the CPU"):
        logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=model_path, device="cpu",
                                  allowUntrained=True)
    assert count_volumes(scene) == n


def test_model_card_summary_lists_kernels_and_warns_untrained(model_path):
    text = logic.modelCardSummary(logic.loadModel(model_path))
    assert "B30f" in text and "BONE" in text and "STANDARD" in text
    assert "untrained" in text
    assert "Linear transfer filters (Method: linear transfer filter): none, network model only" in text
    # The bundled default: a trained kernel-transfer model of 15 kernels, its filter is its own linear part.
    default = logic.loadModel(None)
    assert [d.name for d in default.domains] == DEFAULT_MODEL_KERNELS
    bundled = logic.modelCardSummary(default)
    kernels = next(line for line in bundled.splitlines() if line.startswith("Kernels: "))
    assert all(f"{name} (" in kernels for name in DEFAULT_MODEL_KERNELS)
    assert "Network: kernel transfer" in bundled and "supported pixel size 0.4-1 mm" in bundled
    assert "canvas" not in bundled and "untrained" not in bundled
    assert ("Linear transfer filters (Method: linear transfer filter): every other pair: the model's own "
            "linear transfer") in bundled
    # A StarGAN v2 file with fitted filters (model v1) lists its pairs.
    v1 = logic.modelCardSummary(logic.loadModel(V1_MODEL_PATH))
    assert ("Linear transfer filters (Method: linear transfer filter): BONE -> B30f, B30f -> BONE, "
            "STANDARD -> B30f, B30f -> STANDARD, BONE -> STANDARD, STANDARD -> BONE") in v1


# --------------------------------------------------------------------------------------------------
# Method: linear transfer filter
# --------------------------------------------------------------------------------------------------
def test_filter_method_on_the_bundled_bone_sample(scene, repo_root):
    """The bundled GE BONE series, kernel read from its DICOM tags, filtered to Siemens B30f with the bundled
    (kernel-transfer) model's own linear part: the engine's FilterHarmonizer result, with the input's
    geometry, recorded as 'filter'."""
    from TextureStarGANCore.filter_method import FilterHarmonizer

    sample = repo_root / "TextureStarGANCore" / "samples" / "sim_bone_ct"
    if not sample.is_dir():
        pytest.skip("the bundled sample volume is not in this checkout")
    db = FolderDicomDatabase(sorted(sample.glob("*.dcm")))
    node = node_from_ct_volume(scene, read_volume(sample), name="sample")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    before = voxels_of(node)
    seen = []
    out = logic.harmonizeVolumeNode(node, "B30f", dicomDatabase=db, method="filter",
                                    progressCallback=lambda d, t: seen.append((d, t)))
    model = logic.loadModel(None)
    domains = {d.name: d for d in model.domains}
    harmonizer = FilterHarmonizer(model, domains["GE_BONE"], domains["SIEMENS_B30f"])
    assert "the model's own linear transfer GE_BONE -> SIEMENS_B30f" in harmonizer.filter_origin
    expected = harmonizer.harmonize(before, node.GetSpacing(), "B30f", source="BONE")
    result = voxels_of(out)
    np.testing.assert_array_equal(result, expected)
    assert result.dtype == before.dtype and not np.array_equal(result, before)
    # BONE -> B30f smooths: less high-frequency content inside the body.
    body = before[:, :, 1:] > -500

    def roughness(v):
        return float(np.abs(np.diff(v.astype(np.float32), axis=2))[body].mean())

    assert roughness(result) < 0.8 * roughness(before)
    np.testing.assert_array_equal(voxels_of(node), before)
    assert seen[-1] == (before.shape[0], before.shape[0])
    attrs = {k: out.GetAttribute("CTHarmonization." + k) for k in
             ("Method", "SourceKernel", "SourceKernelFrom", "TargetKernel", "Device")}
    assert attrs == {"Method": "filter", "SourceKernel": "GE_BONE", "SourceKernelFrom": "DICOM",
                     "TargetKernel": "SIEMENS_B30f", "Device": "cpu"}
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(a)
    out.GetIJKToRASMatrix(b)
    np.testing.assert_allclose(matrix_array(b), matrix_array(a), atol=1e-9)


def _toshiba_fc13_slice(real_ct_dir, folder):
    """A copy of one real slice relabelled as a Toshiba FC13 series: a kernel no model here knows."""
    import pydicom

    ds = pydicom.dcmread(sorted(real_ct_dir.glob("*.dcm"))[0])
    ds.Manufacturer, ds.ManufacturerModelName, ds.ConvolutionKernel = "TOSHIBA", "Aquilion ONE", "FC13"
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    path = folder / "fc13.dcm"
    ds.save_as(path)
    return path


def test_filter_method_refuses_an_unknown_source_a_pair_without_filter_and_a_reference(
        scene, model_path, real_ct_dir, tmp_path):
    node = add_volume(scene, body_phantom(4, 64))
    bundled = None  # the bundled default model: its own linear transfer for every pair of its kernels
    # No DICOM kernel, no chosen source: say to choose the source kernel, and why the filter needs it (the
    # kernel-transfer model estimates an unknown source for its network, never for the filter).
    _expect_refusal(scene, node, "no DICOM information.*Choose the source kernel.*transfer filter needs it",
                    bundled, sourceKernel=None, method="filter")
    # A kernel the model does not know (Toshiba FC13): the filter cannot guess it either.
    db = FolderDicomDatabase([_toshiba_fc13_slice(real_ct_dir, tmp_path)])
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    _expect_refusal(scene, node, r"FC13.*TOSHIBA.*Choose the closest source kernel.*linear transfer filter "
                    "needs it", bundled, sourceKernel=None, dicomDatabase=db, method="filter")
    # The real GE STD+ series is one of the bundled model's kernels: read from DICOM, not refused.
    std_plus = FolderDicomDatabase(sorted(real_ct_dir.glob("*.dcm"))[:1])
    node.SetAttribute("DICOM.instanceUIDs", " ".join(std_plus.uids))
    job = logic.prepareHarmonization(node, "B30f", None, bundled, "cpu", dicomDatabase=std_plus,
                                     method="filter")
    assert (job.source.name, job.sourceFoundBy, job.target.name) == ("GE_HISPEED_STDPLUS", "DICOM",
                                                                      "SIEMENS_B30f")
    # A StarGAN v2 model that does not know STD+ (model v1) refuses it the same way.
    _expect_refusal(scene, node, r"STD\+.*Choose the closest source kernel.*linear transfer filter needs it",
                    V1_MODEL_PATH, sourceKernel=None, dicomDatabase=std_plus, method="filter")
    # A pair without a fitted filter: the engine's message (the fitted pairs) as an input error.
    _expect_refusal(scene, node, r"no fitted transfer filter for BONE -> B30f \(its filters: none\).*"
                    "Choose 'Network model'", model_path, method="filter")
    reference = add_volume(scene, body_phantom(4, 64, seed=2), name="B30f scan")
    _expect_refusal(scene, node, "does not use a reference volume", bundled, referenceNode=reference,
                    method="filter")
    _expect_refusal(scene, node, "unknown method 'gan'", bundled, method="gan")


def test_bundled_sample_is_detected_as_bone_and_harmonized(scene, model_path, repo_root):
    """What the in-Slicer self-test does, headless: the bundled DICOM sample, kernel read from its tags."""
    sample = repo_root / "TextureStarGANCore" / "samples" / "sim_bone_ct"
    if not sample.is_dir():
        pytest.skip("the bundled sample volume is not in this checkout")
    files = sorted(sample.glob("*.dcm"))
    db = FolderDicomDatabase(files)
    node = node_from_ct_volume(scene, read_volume(sample), name="sample")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    before = voxels_of(node)
    out = logic.harmonizeVolumeNode(node, "B30f", modelPath=model_path, device="cpu", dicomDatabase=db,
                                    allowUntrained=True)
    assert out.GetAttribute("CTHarmonization.SourceKernel") == "BONE"
    assert voxels_of(out).shape == before.shape == (len(files), 512, 512)
    np.testing.assert_array_equal(voxels_of(node), before)


def test_detected_kernel_line_for_the_gui(scene, model_path, ct_small_path, real_ct_dir):
    domains = logic.loadModel(model_path).domains
    node = add_volume(scene, body_phantom(slices=4, size=64))
    assert logic.describeDetectedKernel(node, domains).startswith("No DICOM kernel information")
    known = FolderDicomDatabase([ct_small_path])
    node.SetAttribute("DICOM.instanceUIDs", " ".join(known.uids))
    assert logic.describeDetectedKernel(node, domains, known).endswith("= model kernel STANDARD")
    unknown = FolderDicomDatabase(sorted(real_ct_dir.glob("*.dcm"))[:1])
    node.SetAttribute("DICOM.instanceUIDs", " ".join(unknown.uids))
    assert "STD+" in logic.describeDetectedKernel(node, domains, unknown)
    assert "not one of the model's kernels" in logic.describeDetectedKernel(node, domains, unknown)
    # A kernel-transfer model takes the nearest GE kernel of its own (GE STD+ -> STANDARD) and says so.
    line = logic.describeDetectedKernel(node, domains, unknown, canEstimate=True)
    assert "STD+" in line and "kernel family is STANDARD" in line
    for method in (logic.METHOD_MODEL, logic.METHOD_FILTER):
        found = logic._resolveSource(node, list(domains), None, unknown, method, family=True)
        assert found[0].name == "STANDARD" and found[1] == logic.SOURCE_FAMILY


def test_a_kernel_transfer_model_runs_with_a_chosen_or_estimated_source(scene, kt_model_path, ct_small_path):
    node = add_volume(scene, body_phantom(slices=3, size=64), name="Chest")  # 0.7 mm pixels, no DICOM
    voxels = voxels_of(node)
    seen = []
    out = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=kt_model_path, device="cpu",
                                    progressCallback=lambda d, t: seen.append((d, t)), allowUntrained=True)
    assert seen[-1] == (3, 3) and voxels_of(out).shape == voxels.shape
    assert not np.array_equal(voxels_of(out), voxels)
    np.testing.assert_array_equal(voxels_of(node), voxels)
    attrs = {k: out.GetAttribute("CTHarmonization." + k) for k in
             ("SourceKernel", "SourceKernelFrom", "TargetKernel", "Method", "Notes", "Noise")}
    assert attrs == {"SourceKernel": "BONE", "SourceKernelFrom": "chosen", "TargetKernel": "B30f",
                     "Method": "model", "Notes": "", "Noise": "not in this model"}
    domains = logic.loadModel(kt_model_path).domains
    assert "the model estimates it from the image" in logic.describeDetectedKernel(node, domains,
                                                                                   canEstimate=True)
    # No DICOM information: a kernel-transfer model estimates the source from the image.
    job = logic.prepareHarmonization(node, "B30f", None, kt_model_path, "cpu", allowUntrained=True)
    assert job.source is None and job.sourceFoundBy == "estimated"
    job.run()
    assert job.source.name == job.runInfo["source"]
    assert job.sourceFoundBy.startswith("estimated from the image")
    out = logic.finishHarmonization(job, scene)
    assert out.GetAttribute("CTHarmonization.SourceKernelFrom").startswith("estimated from the image (p=")
    # DICOM that names a model kernel is used as before.
    db = FolderDicomDatabase([ct_small_path])
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    job = logic.prepareHarmonization(node, "B30f", None, kt_model_path, "cpu", dicomDatabase=db,
                                     allowUntrained=True)
    assert (job.source.name, job.sourceFoundBy) == ("STANDARD", "DICOM")


def test_a_kernel_transfer_model_refuses_a_reference_and_filters_with_its_linear_part(scene, kt_model_path):
    node = add_volume(scene, body_phantom(slices=2, size=64), name="Chest")
    other = add_volume(scene, body_phantom(slices=2, size=64, seed=2), name="B30f scan")
    with pytest.raises(logic.HarmonizationInputError, match="kernel-transfer model.*Clear the reference"):
        logic.prepareHarmonization(node, "B30f", "BONE", kt_model_path, "cpu", referenceNode=other,
                                   allowUntrained=True)
    # The filter needs a known source: no estimate for it.
    with pytest.raises(logic.HarmonizationInputError, match="no DICOM information"):
        logic.prepareHarmonization(node, "B30f", None, kt_model_path, "cpu", allowUntrained=True,
                                   method="filter")
    out = logic.harmonizeVolumeNode(node, "B30f", sourceKernel="BONE", modelPath=kt_model_path, device="cpu",
                                    allowUntrained=True, method="filter")
    assert out.GetAttribute("CTHarmonization.Method") == "filter"
    summary = logic.modelCardSummary(logic.loadModel(kt_model_path))
    assert "kernel transfer" in summary and "supported pixel size 0.4-1 mm" in summary
    assert "canvas" not in summary and "every other pair: the model's own linear transfer" in summary


def test_a_kernel_transfer_model_takes_the_kernel_family_and_says_when_it_is_the_target(
        scene, kt_model_path, real_ct_dir):
    db = FolderDicomDatabase(sorted(real_ct_dir.glob("*.dcm"))[:2])  # GE STD+: nearest of the model: STANDARD
    node = add_volume(scene, body_phantom(slices=2, size=64), name="Head")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(db.uids))
    job = logic.prepareHarmonization(node, "B30f", None, kt_model_path, "cpu", dicomDatabase=db,
                                     allowUntrained=True)
    assert job.source.name == "STANDARD" and job.sourceFoundBy == logic.SOURCE_FAMILY
    n = count_volumes(scene)
    with pytest.raises(logic.HarmonizationInputError, match="nearest of its kernel family is the target"):
        logic.prepareHarmonization(node, "STANDARD", None, kt_model_path, "cpu", dicomDatabase=db,
                                   allowUntrained=True)
    assert count_volumes(scene) == n

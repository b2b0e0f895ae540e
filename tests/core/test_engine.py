"""The engine against SyncTalk_2D's per-frame loop, its template order, mask, crop rule and input checks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from inference_pod.bench import naive
from inference_pod.core.engine import CROP_SIZE, MODEL_INPUT_SIZE, Engine, mouth_mask, pingpong_index
from inference_pod.core.model import LipSyncUNet, random_weights
from inference_pod.errors import AudioError, InvalidInput
from inference_pod.package import extract_package, write_package

# One torch thread: these tests compare frames, not speed, and torch's own threads spinning against a busy
# machine's other processes made the template-storage comparison take 240 s of its 300 s limit.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("n", [2, 3, 4, 7, 12])
def test_pingpong_order_is_synctalks(n):
    assert [pingpong_index(i, n) for i in range(60)] == list(naive.template_walk(n - 1, 60))


def test_pingpong_sequence_spelled_out():
    assert [pingpong_index(i, 4) for i in range(10)] == [1, 2, 3, 2, 1, 0, 1, 2, 3, 2]
    assert pingpong_index(5, 1) == 0
    with pytest.raises(InvalidInput, match="frame id"):
        pingpong_index(-1, 4)


def test_mask_blanks_opencv_rectangle_5_5_310_305():
    mask = mouth_mask()
    assert mask.shape == (MODEL_INPUT_SIZE, MODEL_INPUT_SIZE)
    zero_rows, zero_cols = np.nonzero(mask == 0)
    # cv2.rectangle(img, (x, y, w, h), ..., -1) fills x..x+w-1, y..y+h-1
    assert (zero_rows.min(), zero_rows.max(), zero_cols.min(), zero_cols.max()) == (5, 309, 5, 314)
    assert (mask == 0).sum() == 305 * 310


@pytest.fixture(scope="module")
def engine(demo_character_package) -> Engine:
    return Engine.from_package(demo_character_package, max_batch=8)


def test_batched_engine_reproduces_synctalk_loop(engine, demo_character_package, tmp_path):
    features = engine.default_features
    dataset = naive.write_dataset_layout(demo_character_package, tmp_path / "layout")
    net = naive.load_network(demo_character_package.unet_state(), engine.mode, demo_character_package.manifest.model_width, "cpu")
    n = 14  # past the turn at both ends of the 12-template walk
    reference = list(naive.run_loop(dataset, net, features, limit=n))
    ids = list(range(n))
    templates = [engine.template_index(i) for i in ids]
    predictions = engine.predict(templates, engine.windows(features, ids))  # two device batches of 8 and 6
    for i in ids:
        ours = engine.composite(templates[i], predictions[i]).astype(int)
        diff = np.abs(ours - reference[i].astype(int))
        assert diff.max() <= 2, f"frame {i}: max diff {diff.max()}"


def test_composite_only_touches_the_crop(engine, demo_character_package):
    t = 3
    box = engine.crop_box(t)
    template = engine.composite(t, engine.template_crop(t))  # pasting the template back: near-identity
    original = engine._frames.get(t)
    outside = np.ones(original.shape[:2], bool)
    outside[box.y1 : box.y2, box.x1 : box.x2] = False
    assert np.array_equal(template[outside], original[outside])
    assert box.size == box.x2 - box.x1 and tuple(demo_character_package.crop_boxes()[t][:2]) == (box.x1, box.y1)


def test_prediction_is_320_bgr_uint8_and_deterministic(engine):
    w = engine.windows(engine.default_features, [0, 1])
    a = engine.predict([1, 2], w)
    b = engine.predict([1, 2], w)
    assert a.shape == (2, 320, 320, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)


def test_track_features_length_matches_synctalk_frame_count(engine):
    from inference_pod.core import audio

    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    features = engine.track_features(wav)
    assert features.shape == (audio.frame_count(len(wav)), 512)
    np.testing.assert_array_equal(features[0], features[1])
    np.testing.assert_array_equal(features[-1], features[-2])
    with pytest.raises(AudioError, match="too short"):
        engine.track_features(wav[:1000])


@pytest.mark.parametrize(
    "templates, windows, message",
    [([0], np.zeros((2, 32, 16, 16), np.float32), "audio windows must have shape"),
     ([0], np.zeros((1, 32, 16), np.float32), "audio windows must have shape"),
     ([99], np.zeros((1, 32, 16, 16), np.float32), "template index out of range"),
     ([-1], np.zeros((1, 32, 16, 16), np.float32), "template index out of range")],
)
def test_predict_rejects_bad_input(engine, templates, windows, message):
    with pytest.raises(InvalidInput, match=message):
        engine.predict(templates, windows)


def test_bad_engine_options(demo_character_package):
    with pytest.raises(InvalidInput, match="precision"):
        Engine.from_package(demo_character_package, precision="int8")
    with pytest.raises(InvalidInput, match="max batch"):
        Engine.from_package(demo_character_package, max_batch=0)
    with pytest.raises(InvalidInput, match="template storage must be one of device, host, compressed"):
        Engine.from_package(demo_character_package, template_storage="disk")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidInput, match="CUDA is not available"):
            Engine.from_package(demo_character_package, device="cuda")


def test_bf16_on_cpu_stays_close_to_fp32(engine, demo_character_package):
    low = Engine.from_package(demo_character_package, precision="bf16", max_batch=8)
    ids = list(range(8))
    w = engine.windows(engine.default_features, ids)
    templates = [engine.template_index(i) for i in ids]
    diff = np.abs(low.predict(templates, w).astype(int) - engine.predict(templates, w).astype(int))
    assert np.percentile(diff, 99) <= 8, np.percentile(diff, 99)


def test_hubert_character_needs_precomputed_features(demo_character_package, tmp_path):
    pkg = demo_character_package
    frames = [pkg.frame_bytes(i) for i in range(pkg.manifest.frame_count)]
    out = tmp_path / "hubert.zip"
    write_package(out, name="hubert-demo", version="1", audio_mode="hubert", model_width=4, fps=25, frames=frames,
                  frame_ext=pkg.manifest.frame_ext, crop_boxes=pkg.crop_boxes(),
                  unet_state=random_weights(LipSyncUNet("hubert", 4), 5).state_dict(), audio_encoder_state=None)
    hubert = Engine.from_package(extract_package(out, tmp_path / "x"))
    assert hubert.audio_shape == (32, 32, 32) and hubert.default_features is None
    with pytest.raises(AudioError, match="hubert features"):
        hubert.track_features(np.zeros(16000, np.float32))
    features = np.random.default_rng(1).standard_normal((20, 2, 1024)).astype(np.float32)
    out_frames = hubert.predict([1, 2], hubert.windows(features, [0, 19]))
    assert out_frames.shape == (2, 320, 320, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_on_gpu_matches_fp32(demo_character_package, precision):
    ref = Engine.from_package(demo_character_package)  # fp32 CPU: SyncTalk_2D's numbers
    gpu = Engine.from_package(demo_character_package, device="cuda", precision=precision, max_batch=16)
    ids = list(range(16))
    w = ref.windows(ref.default_features, ids)
    templates = [ref.template_index(i) for i in ids]
    diff = np.abs(gpu.predict(templates, w).astype(int) - ref.predict(templates, w).astype(int))
    assert np.percentile(diff, 99) <= 4 and diff.mean() < 1.0, (diff.max(), diff.mean())
    # odd batch sizes replay a padded CUDA graph: results must not depend on the padding
    np.testing.assert_array_equal(gpu.predict(templates[:5], w[:5]), gpu.predict(templates, w)[:5])


@pytest.fixture(scope="module")
def wide_engine(tmp_path_factory) -> Engine:
    """A 320x240 character: its crop box is a small part of the frame, so full frames are spliced."""
    from inference_pod.tools.demo_character import build_demo_package

    out = tmp_path_factory.mktemp("wide") / "wide.zip"
    build_demo_package("wide", out, width=4, frames=4, seed=1, size=(320, 240), audio_seconds=1.0)
    return Engine.from_package(extract_package(out, tmp_path_factory.mktemp("wide-x") / "wide"), max_batch=4)


def test_full_frame_jpeg_is_the_encoded_composite_byte_for_byte(wide_engine):
    from inference_pod.core.encoding import OutputSpec, decode_image, encode_image

    engine = wide_engine
    ids = list(range(4))
    templates = [engine.template_index(i) for i in ids]
    predictions = engine.predict(templates, engine.windows(engine.default_features, ids))
    before = engine.memory_bytes()
    for quality in (1, 55, 90, 100):
        for t, prediction in zip(templates, predictions, strict=True):
            expected = encode_image(engine.composite(t, prediction), OutputSpec(jpeg_quality=quality))
            first = engine.full_frame_jpeg(t, prediction, quality)
            again = engine.full_frame_jpeg(t, prediction[::-1].copy(), quality)  # another frame, same template
            assert first.data == expected and (first.width, first.height) == (320, 240)
            assert again.data == encode_image(engine.composite(t, prediction[::-1]), OutputSpec(jpeg_quality=quality))
            assert np.array_equal(decode_image(again.data, "jpeg"), decode_image(
                encode_image(engine.composite(t, prediction[::-1]), OutputSpec(jpeg_quality=quality)), "jpeg"))
            assert (first.path, again.path) in {("plain", "spliced"), ("spliced", "spliced")}
    assert engine.full_frame_jpeg(templates[0], predictions[0], 90).path == "spliced"
    assert engine.memory_bytes() > before  # the template encodings are counted


def test_concurrent_frames_of_a_new_template_encode_it_whole_once(wide_engine):
    """Frames of one template that arrive together (a batch fanned out over the CPU pool) wait for the
    first one's whole-frame encoding and splice into it: one plain frame per template and quality."""
    from concurrent.futures import ThreadPoolExecutor

    template = 2
    prediction = wide_engine.predict([template], wide_engine.windows(wide_engine.default_features, [0]))[0]
    quality = 37  # a quality no other test asks for: this template's encoding at it does not exist yet
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: wide_engine.full_frame_jpeg(template, prediction, quality), range(16)))
    assert [r.path for r in results].count("plain") == 1
    assert len({r.data for r in results}) == 1


def test_a_crop_box_covering_most_of_the_frame_takes_the_plain_path(engine):
    prediction = engine.template_crop(1)
    for _ in range(2):
        assert engine.full_frame_jpeg(1, prediction, 90).path == "plain"  # 64x64 frames: the box is most of it


def test_identity_network_returns_each_templates_own_region(demo_character_package):
    identity = Engine.from_package(demo_character_package, max_batch=4, identity_network=True)
    templates = [3, 0, 7]
    out = identity.predict(templates, identity.windows(identity.default_features, [0, 1, 2]))
    for t, frame in zip(templates, out, strict=True):
        assert np.array_equal(frame, identity.template_crop(t))


@pytest.mark.parametrize("storage", ["host", "compressed"])
@pytest.mark.parametrize("device_batch", [1, 8])
def test_every_template_storage_gives_byte_identical_frames(engine, demo_character_package, storage, device_batch):
    """Where the templates live changes what a batch costs, never a pixel: predictions, composites and full
    frames are byte for byte those of device-resident templates (fp32, CPU)."""
    other = Engine.from_package(demo_character_package, max_batch=8, device_batch=device_batch,
                                template_storage=storage)
    ids = list(range(14))  # two batches of 8 and 6, past both turns of the 12-template walk
    templates = [engine.template_index(i) for i in ids]
    windows = engine.windows(engine.default_features, ids)
    expected, got = engine.predict(templates, windows), other.predict(templates, windows)
    assert got.dtype == np.uint8 and np.array_equal(got, expected)
    for t, prediction in zip(templates, expected, strict=True):
        assert np.array_equal(other.composite(t, prediction), engine.composite(t, prediction))
        assert other.full_frame_jpeg(t, prediction, 80).data == engine.full_frame_jpeg(t, prediction, 80).data
        assert np.array_equal(other.template_crop(t), engine.template_crop(t))


@pytest.mark.parametrize("storage", ["host", "compressed"])
def test_spliced_full_frames_are_identical_in_every_template_storage(wide_engine, tmp_path_factory, storage):
    from inference_pod.tools.demo_character import build_demo_package

    out = tmp_path_factory.mktemp("wide-" + storage) / "wide.zip"
    build_demo_package("wide", out, width=4, frames=4, seed=1, size=(320, 240), audio_seconds=1.0)
    other = Engine.from_package(extract_package(out, tmp_path_factory.mktemp("wide-x-" + storage) / "wide"),
                                max_batch=4, template_storage=storage)
    ids = templates = list(range(4))  # each template once
    predictions = wide_engine.predict(templates, wide_engine.windows(wide_engine.default_features, ids))
    assert np.array_equal(other.predict(templates, other.windows(other.default_features, ids)), predictions)
    for path in ("plain", "spliced"):  # first the whole frame, then spliced into the kept template encoding
        for t, prediction in zip(templates, predictions, strict=True):
            ours = other.full_frame_jpeg(t, prediction, 75)
            assert ours.data == wide_engine.full_frame_jpeg(t, prediction, 75).data
            assert ours.path == path


@pytest.mark.parametrize("prepared", [False, True], ids=["derived", "mapped"])
def test_memory_use_follows_where_templates_live(demo_character_package, prepared):
    engines = {storage: Engine.from_package(demo_character_package, max_batch=8, template_storage=storage,
                                            prepared_templates=prepared)
               for storage in ("device", "host", "compressed")}  # fresh: no full frames served yet
    use = {storage: engine.memory_use() for storage, engine in engines.items()}
    n = engines["device"].num_templates
    weights = use["host"].device
    inner, crop, staging = 3 * MODEL_INPUT_SIZE**2, 3 * CROP_SIZE**2, 8 * 3 * CROP_SIZE**2
    assert weights > 0 and use["compressed"].device == weights  # off the device: weights only
    assert use["device"].device == weights + n * inner  # resident: one 320x320x3 region a template
    derived = engines["host"].templates.prepared.nbytes  # crops, border strips, template JPEGs, boxes
    assert derived > n * crop
    pngs = use["compressed"].templates
    assert 0 < pngs < n * crop  # PNGs: more than nothing, less than raw
    if prepared:  # the node's page cache: shared, so not this process's private host memory
        assert [use[s].mapped for s in ("device", "host")] == [derived, derived]
        assert use["compressed"].mapped == derived - n * crop + pngs  # its crops mapped as PNGs instead
        assert use["host"].host == use["compressed"].host == staging and use["device"].host == 0
    else:
        assert [use[s].mapped for s in ("device", "host", "compressed")] == [0, 0, 0]
        assert use["host"].host == derived + staging and use["device"].host == derived
        assert use["compressed"].host == derived - n * crop + pngs + staging  # PNGs in private memory
    assert [use[s].templates for s in ("device", "host")] == [n * (inner + crop), n * crop]
    assert engines["device"].memory_bytes() == use["device"].total == use["device"].device + use["device"].host


def test_decoded_frames_are_counted_as_they_come_and_go(demo_character_package):
    """The frame cache keeps a running byte count (the model store reads it on every scrape): it must equal
    the frames actually held, through decodes, evictions and frames decoded twice at once."""
    first = Engine.from_package(demo_character_package)
    per_frame = first.composite(0, first.template_crop(0)).nbytes
    engine = Engine.from_package(demo_character_package, frame_budget_bytes=2 * per_frame + 1)  # 2 of 6 fit
    frames = engine._frames
    fixed = engine.memory_use().host - frames.nbytes()
    with ThreadPoolExecutor(4) as pool:  # the same templates at once: some are decoded twice
        list(pool.map(lambda i: engine.composite(i % 6, engine.template_crop(i % 6)), [0, 1, 2, 3, 1, 4, 5, 0] * 4))
    held = sum(f.nbytes for f in frames._decoded.values())
    assert frames.nbytes() == held and len(frames._decoded) == 2
    assert engine.memory_use().host == fixed + held

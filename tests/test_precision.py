"""``--precision``: detection from fake cpuinfo, the bf16 model against float32, and where the
precision is recorded (run.json, report, checkpoint fingerprint, classifier bundle)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import BUNDLED, SMALL_SIZE
from runtime_doubles import count_calls, prepare_counts

from fruitdask import checkpoint, storage
from fruitdask.backends.spark import backend as spark_backend
from fruitdask.config import build_config
from fruitdask.errors import ClusterError, ConfigError
from fruitdask.features import model, precision
from fruitdask.features.featurize import featurize_bytes
from fruitdask.features.runtimes.tensorflow import build_vgg16, import_keras
from fruitdask.features.settings import FeatureSettings, differences
from fruitdask.features.weights_file import WeightsArrays

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 sha_ni
"""
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Platinum 8175M CPU\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"


def test_cpu_flags_and_model_from_cpuinfo_text():
    assert "avx512_bf16" in precision.cpu_flags(ZEN4)
    assert precision.cpu_bf16_flags(precision.cpu_flags(SAPPHIRE)) == ["amx_bf16", "amx_tile"]
    assert precision.cpu_bf16_flags(precision.cpu_flags(SKYLAKE)) == []
    assert precision.cpu_model(SKYLAKE) == "Intel(R) Xeon(R) Platinum 8175M CPU"
    assert precision.cpu_flags("") == set()


@pytest.mark.parametrize(
    ("requested", "cpuinfo", "gpus", "expected"),
    [
        ("auto", ZEN4, [], "bfloat16"),
        ("auto", SAPPHIRE, [], "bfloat16"),
        ("auto", SKYLAKE, [], "float32"),
        ("auto", SKYLAKE, [7.5], "float32"),  # Turing: no bf16 tensor cores
        ("auto", SKYLAKE, [8.0], "bfloat16"),  # Ampere
        ("auto", "", [], "float32"),  # no /proc/cpuinfo (macOS)
        ("float32", ZEN4, [9.0], "float32"),
        ("bfloat16", ZEN4, [], "bfloat16"),
        ("bfloat16", SKYLAKE, [9.0], "bfloat16"),
    ],
)
def test_resolve_picks_bf16_only_on_native_hardware(requested, cpuinfo, gpus, expected):
    resolved = precision.resolve(requested, cpuinfo, gpus)
    assert resolved.precision == expected and resolved.requested == requested
    if requested == "auto":
        assert resolved.reason.startswith("auto: ")


def test_bfloat16_without_native_support_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as e:
        precision.resolve("bfloat16", SKYLAKE, [7.5])
    msg = str(e.value)
    assert "Platinum 8175M" in msg and "avx512_bf16" in msg and "--precision float32" in msg and "c7i" in msg
    with pytest.raises(ConfigError, match="use one of float32, bfloat16, int8, auto"):
        precision.resolve("fp16", ZEN4)


def test_precision_flag_over_environment_over_default():
    base = {"input": "in", "output": "out"}
    # auto by default: the bench's held-out accuracy is the same in both (docs/architecture-review.md)
    assert build_config(base, {}).precision == "auto"
    assert build_config(base, {"FRUITDASK_PRECISION": "float32"}).precision == "float32"
    assert build_config({**base, "precision": "bfloat16"}, {"FRUITDASK_PRECISION": "float32"}).precision == "bfloat16"
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        build_config(base, {"FRUITDASK_PRECISION": "half"})


def test_this_machine_resolves_auto_from_its_own_flags():
    # Whatever the machine, auto must agree with the flags its /proc/cpuinfo lists.
    native = precision.cpu_bf16_flags(precision.cpu_flags(precision.read_cpuinfo()))
    resolved = precision.detect_and_resolve("auto")
    if native:
        assert resolved.precision == "bfloat16" and native[0] in resolved.reason
    elif not precision.gpu_has_bf16(precision.gpu_compute_capabilities()):
        assert resolved.precision == "float32"


def test_bf16_features_match_float32_and_no_policy_leaks(weights_file):
    keras = import_keras()
    source = WeightsArrays.of(model.load_weights(str(weights_file))[0], "test-bf16")
    bf16 = model.cached_runtime(source, FeatureSettings("test-bf16", SMALL_SIZE, "avg", 4, "bfloat16"))
    # The policy was set for the build only: models built afterwards are float32 again.
    assert keras.config.dtype_policy().name == "float32"
    assert build_vgg16(SMALL_SIZE).layers[1].compute_dtype == "float32"
    assert bf16.model.layers[1].compute_dtype == "bfloat16" and bf16.model.output.dtype == "float32"
    assert bf16.describe()["precision"] == "bfloat16"
    fp32 = model.cached_runtime(source, FeatureSettings("test-bf16", SMALL_SIZE, "avg", 4))
    assert fp32 is not bf16  # precision is part of the cache key
    photos = sorted(BUNDLED.rglob("*.jpg"))[::12][:8]
    contents = [p.read_bytes() for p in photos]
    a = featurize_bytes(fp32, contents, SMALL_SIZE, "avg", 4).features
    b = featurize_bytes(bf16, contents, SMALL_SIZE, "avg", 4).features
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (8, 512)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.01
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    assert not np.array_equal(a, b)  # really computed in bfloat16


def test_checkpoint_fingerprint_and_bundle_spec_carry_the_precision():
    fp = checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8))
    assert checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8, "float32")) == fp  # old float32 checkpoints stay valid
    assert checkpoint.fingerprint(FeatureSettings("w", 32, "avg", 8, "bfloat16")) != fp
    model_spec = FeatureSettings("w", 32, "avg", 8, "bfloat16")
    diffs = differences(model_spec, FeatureSettings("w", 32, "avg", 16))
    assert [d.reason("model") for d in diffs] == ["precision float32 (model: bfloat16)"]


class _Broadcast:
    def __init__(self, value):
        self.value = value


def test_spark_executor_body_builds_the_requested_precision(weights_file, tmp_path):
    from fruitdask import checkpoint
    from fruitdask.lake import tasks

    count_calls()
    weights_arrays = model.load_weights(str(weights_file))[0]
    manifest = _one_photo_manifest(tmp_path)
    before = prepare_counts()
    settings = FeatureSettings("spark-bf16", SMALL_SIZE, "avg", 4, "bfloat16")
    sink = tasks.Sink(str(tmp_path / "table"), "r", "s", {})
    ckpt = checkpoint.Checkpoints(str(tmp_path / "ckpt"), False, {})
    weights = spark_backend.BroadcastWeights(_Broadcast(weights_arrays), "spark-bf16")
    out = spark_backend.featurize_index(0, manifest, tasks.FeaturizeJob(weights, settings, ckpt, sink, None), 1)
    assert [r.kind for r in out] == [tasks.ReceiptKind.STAGED] and prepare_counts()["spark-bf16"] == before.get("spark-bf16", 0) + 1
    assert ("tensorflow", "spark-bf16", SMALL_SIZE, "bfloat16") in model._RUNTIMES


def _one_photo_manifest(tmp_path) -> str:
    import pyarrow.parquet as pq

    from fruitdask.schema import MANIFEST_SCHEMA

    photo = sorted(BUNDLED.rglob("*.jpg"))[0]
    url = str(tmp_path / "manifest.parquet")
    pq.write_table(pa.table([[str(photo)], [photo.parent.name], [f"{photo.parent.name}/{photo.name}"], ["1:1"], ["added"]],
                            schema=MANIFEST_SCHEMA), url)
    return url


@pytest.mark.integration
@pytest.mark.slow
def test_run_records_the_precision_everywhere(tiny_images, weights_file, tmp_path, monkeypatch):
    from fruitdask.classifier.classify import load_run
    from fruitdask.cli import main

    # The client decides; a Zen 4 cpuinfo makes auto pick bf16 on any machine (emulated
    # bf16 is slow but exact enough for the check).
    monkeypatch.setattr(precision, "read_cpuinfo", lambda path="/proc/cpuinfo": ZEN4)
    out = tmp_path / "out"
    code = main(["run", "--input", str(tiny_images), "--output", str(out), "--image-size", str(SMALL_SIZE),
                 "--weights", str(weights_file), "--precision", "auto", "--workers", "1", "--quiet"])
    assert code == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["config"]["precision"] == "bfloat16"
    assert doc["precision"] == {"requested": "auto", "precision": "bfloat16", "reason": "auto: CPU has avx512_bf16"}
    assert "bfloat16" in (out / "report.html").read_text()
    assert load_run(str(out)).spec.precision == "bfloat16"
    import pyarrow.parquet as pq

    table = pq.read_table(Path(out, "features"))
    assert table.schema.field("features").type.value_type == pa.float32()
    # The workers really ran bf16: the features are the in-process bf16 model's, not float32's.
    row = table.slice(0, 1).to_pylist()[0]
    weights = model.load_weights(str(weights_file))[0]
    contents = [Path(row["path"]).read_bytes()]
    got = np.asarray(row["features"], np.float32)
    source = WeightsArrays.of(weights, "w")
    want16 = featurize_bytes(model.cached_runtime(source, FeatureSettings("w", SMALL_SIZE, "avg", 4, "bfloat16")), contents,
                             SMALL_SIZE, "avg", 4).features[0]
    want32 = featurize_bytes(model.cached_runtime(source, FeatureSettings("w", SMALL_SIZE, "avg", 4)), contents,
                             SMALL_SIZE, "avg", 4).features[0]
    assert np.abs(got - want16).max() < np.abs(got - want32).max() / 10


def test_bundle_keeps_the_precision_and_featurizes_with_it(tmp_path, weights_file, monkeypatch):
    import dask
    import dask.array as da

    from fruitdask.classifier.bundle import LinearClassifier, ModelBundle, WeightsRef
    from fruitdask.classifier.classify import fit_classifier
    from fruitdask.features import frames
    from fruitdask.pca_streamed import fit_incremental_pca

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 512)).astype(np.float32)
    with dask.config.set(scheduler="sync"):
        red = fit_incremental_pca(da.from_array(x, chunks=10), components=3, variance=0.95, batch_size=None)
    clf = LinearClassifier.from_sklearn(fit_classifier(red.transform(x), np.array(["a", "b"] * 10)))
    _, info = model.load_weights(str(weights_file))
    spec = FeatureSettings(info.sha256, SMALL_SIZE, "avg", 4, "bfloat16")
    ref = WeightsRef("file", str(weights_file), info.sha256, file_sha256=info.file_sha256 or storage.file_sha256(str(weights_file)))
    ModelBundle(spec, ref, red, clf).save(str(tmp_path / "m"))
    back = ModelBundle.load(str(tmp_path / "m"))
    assert back.spec.precision == "bfloat16"
    seen = []
    real = frames.featurize_frame
    monkeypatch.setattr(frames, "featurize_frame", lambda *a, **k: seen.append(a[2].precision) or real(*a, **k))
    photo = sorted(BUNDLED.rglob("*.jpg"))[0]
    back.featurizer().featurize([str(photo)])
    assert seen == ["bfloat16"]


def test_a_remote_cluster_gets_bf16_only_when_every_worker_has_it():
    bf = {"requested": "auto", "precision": "bfloat16", "reason": "auto: CPU has avx512_bf16"}
    fp = {"requested": "auto", "precision": "float32", "reason": "auto: no native bf16"}
    both = precision.agree("auto", {"tcp://a:1": bf, "tcp://b:1": dict(bf)})
    assert both.precision == "bfloat16" and "all 2 workers" in both.reason
    mixed = precision.agree("auto", {"tcp://a:1": bf, "tcp://b:1": fp})
    assert mixed.precision == "float32" and "tcp://b:1" in mixed.reason
    with pytest.raises(ConfigError, match="tcp://b:1"):
        precision.agree("bfloat16", {"tcp://a:1": {**bf, "requested": "bfloat16"}, "tcp://b:1": fp})
    assert precision.agree("float32", {"tcp://a:1": bf}).precision == "float32"
    with pytest.raises(ClusterError):
        precision.agree("auto", {})


def test_a_worker_answers_its_own_resolution_and_never_raises(monkeypatch):
    monkeypatch.setattr(precision, "read_cpuinfo", lambda: "model name: Old CPU\nflags: fpu avx2\n")
    monkeypatch.setattr(precision, "gpu_compute_capabilities", list)
    assert precision.detect_on_worker("auto")["precision"] == "float32"
    refused = precision.detect_on_worker("bfloat16")
    assert refused["precision"] == "float32" and "emulated" in refused["reason"]


def test_a_remote_cluster_resolves_auto_on_its_workers_not_the_client(tiny_images, weights_file, tmp_path, monkeypatch,
                                                                      local_cluster):
    from fruitdask.cli import main

    # The workers are processes of their own (unpatched: this machine's real flags); the
    # client is told it has an old CPU, so a client-side decision would show.
    expected = precision.resolve("auto", precision.read_cpuinfo(), []).precision
    cluster, _ = local_cluster(1, 1, client=False)
    monkeypatch.setattr(precision, "read_cpuinfo", lambda path="/proc/cpuinfo": "model name: Old CPU\nflags: fpu avx2\n")
    out = tmp_path / "out"
    code = main(["run", "--input", str(tiny_images), "--output", str(out), "--image-size", str(SMALL_SIZE),
                 "--weights", str(weights_file), "--precision", "auto", "--cluster", cluster.scheduler_address, "--quiet"])
    assert code == 0
    doc = json.loads((out / "run.json").read_text())
    assert doc["precision"]["precision"] == doc["config"]["precision"] == expected
    assert "worker" in doc["precision"]["reason"], doc["precision"]

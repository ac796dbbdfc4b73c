"""Step 09's fine-tune, the library part: how confident each test product's label is, whether a
threshold can be reached at all, and the fine-tune of a trained model on labeled + pseudo-labeled
pictures (selection, mixed batches, alpha(t), the training step's optimizer and schedule), saved as a
model folder of its own.

`P`, where a function takes it, is the fine-tune's settings: any object with the fields of
`cdkit.steps.pseudo.PseudoParams` (the library never imports the step's class).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cdkit.base.params import ParamsError
from cdkit.train.files import ModelFiles


def final_confidence(final: pd.DataFrame, mean) -> pd.DataFrame:
    """product_id, pred_class (the final products' `final`), prob (its mean probability over the product's
    pictures in `mean`, a mean aggregation; 1 where the MD5 lookup decided), margin, n_preds"""
    from cdkit.pseudo.pseudolabel import product_confidence
    conf = product_confidence(mean).set_index("product_id")
    f = final.set_index("product_id")
    # the mean probability of the final class (0 where it is outside a product's kept candidates)
    pos = pd.Series(np.arange(len(mean.product_id)), index=mean.product_id).reindex(f.index)
    ok = pos.notna().to_numpy()
    p = np.zeros(len(f))
    rows = pos.to_numpy()[ok].astype(np.int64)
    hit = mean.cls[rows] == f["pred_class"].to_numpy()[ok][:, None]
    p[ok] = np.where(hit, np.where(np.isfinite(mean.score[rows]), mean.score[rows], 0), 0).sum(1)
    if "md5" in f:
        p = np.where(f["md5"].to_numpy(bool), 1.0, p)
    return pd.DataFrame({"product_id": f.index.to_numpy(np.int64), "pred_class": f["pred_class"].to_numpy(np.int64),
                         "prob": p, "margin": conf["margin"].reindex(f.index).fillna(0).to_numpy(),
                         "n_preds": conf["n_preds"].reindex(f.index).fillna(0).to_numpy(np.int64)})


def test_confidence(store, final: pd.DataFrame = None) -> pd.DataFrame:
    """Each test product's label and confidence: `final` products (step 08's) scored by the mean of `store`
    (the ensemble's), or with final None the mean of `store` (one model's) alone"""
    from cdkit.infer.aggregate import aggregate_stores
    from cdkit.pseudo.pseudolabel import product_confidence
    if final is not None: return final_confidence(final, aggregate_stores([store], "mean"))
    return product_confidence(aggregate_stores([store], "mean", k_out=2))


test_confidence.__test__ = False  # not a pytest test, whatever its name


def reach(model_dir: Path):
    "(highest probability, label smoothing) of a member: a trained model (model.json) or step 06b's fusion heads (fusion.json)"
    from cdkit.train.models import read_card
    if ModelFiles(model_dir).fusion_card.exists():
        from cdkit.infer.fusion import FusionCard
        card = FusionCard.read(ModelFiles(model_dir).fusion_card)
        ls, n = card.params["label_smoothing"], next(iter(card.spec.values()))["n_classes"]
        return 1.0 - ls + ls / n, ls
    c = read_card(model_dir)
    return c.max_prob, c.label_smoothing


def check_threshold(threshold, model_dirs: dict):
    "Refuse a threshold that the label source's models ({name: folder}) cannot reach under their label smoothing"
    cards = {m: reach(d) for m, d in model_dirs.items()}
    best = max(r for r, _ in cards.values())
    if threshold > best:
        smooth = ", ".join(f"{m}: label_smoothing={ls}" for m, (_, ls) in cards.items())
        raise ParamsError(f"threshold={threshold} cannot be reached: with {smooth} the highest probability a "
                          f"model gives is {best:.5f}, so (MD5 matches aside) no product would be selected. "
                          f"Lower threshold below {best:.5f} or train without label smoothing")


@dataclass
class Finetuned:
    "What the fine-tune chose and how it trained"
    selection: pd.DataFrame               # chosen products: product_id, pred_class, prob, margin, label, rank
    selection_table: pd.DataFrame         # per class: predicted, chosen, pictures (precision where the truth is known)
    selection_summary: pd.DataFrame       # one row: products, chosen, share, precision, ...
    alpha: pd.DataFrame                   # per training step: iter, epoch, t, alpha, n_labeled, n_pseudo, losses


def pseudo_finetune(P, base, prep, out_dir: Path, store, final=None, device=None, log=print) -> Finetuned:
    """Fine-tune the trained model `base` (`cdkit.train.models.load_trained` onto `device`) on the labeled
    training pictures and the test products pseudo-labeled from `store` and `final` (`test_confidence`),
    as `P` says; save it in `out_dir` (model.pth, model.json naming its base model, alpha.csv,
    selection.parquet)"""
    from fastai.torch_core import set_seed
    from cdkit.base.io import atomic_write
    from cdkit.pseudo.pseudolabel import finetune, finetune_learner, mixed_dataloaders, pseudo_images, select_pseudo, selection_report
    from cdkit.train.learner import opt_func, sample_products
    from cdkit.train.models import save_trained
    conf = test_confidence(store, final)
    chosen = select_pseudo(conf, P.threshold, P.margin, P.fraction, P.cap_per_category, P.rank_by)
    pseudo = pseudo_images(chosen, prep.test_images())
    table, summary = selection_report(chosen, conf, prep.truth("test"), prep.catalog, pseudo)
    log(f"{len(chosen)} of {len(conf)} test products pseudo-labeled ({len(pseudo)} pictures) from {P.labels_from}")
    if not len(chosen):
        raise ValueError(f"no test product reached threshold={P.threshold} / margin={P.margin}: nothing to "
                         "fine-tune on; lower them")
    train_images = prep.train_images()
    valid_rows = prep.valid_mask(train_images)
    # the labeled side: what the backbones train on (neither validation nor the fusion split)
    labeled = sample_products(train_images[prep.train_mask(train_images)], P.max_train_images, P.seed).reset_index(drop=True)
    valid = train_images[valid_rows].reset_index(drop=True)
    set_seed(P.seed)
    dls = mixed_dataloaders(labeled, pseudo, prep.train_bson, prep.test_bson, valid, prep.catalog.n_classes, bs=P.bs,
                            pseudo_per_labeled=P.pseudo_per_labeled, epoch_size=P.epoch_size, size=base.size,
                            item_size=base.item_size, mean=base.mean, std=base.std, num_workers=P.num_workers,
                            seed=P.seed, device=device)
    learn = finetune_learner(base.model, dls, wd=P.wd, path=out_dir, opt_func=opt_func(P.optimizer, P.momentum))
    alpha = finetune(learn, P.epochs, P.lr, P.pct_start, P.T1, P.T2, P.alpha_final, P.alpha_unit,
                     alpha_form=P.alpha_form, alpha_min=P.alpha_min, one_cycle=P.one_cycle, lr_steps=P.lr_steps,
                     lr_step_factors=P.lr_step_factors)
    card = base.card
    card.base_model, card.epochs_done = P.base, card.epochs_done + P.epochs
    save_trained(base.model, out_dir, card)
    atomic_write(ModelFiles(out_dir).pseudo_alpha, lambda tmp: alpha.to_csv(tmp, index=False))
    atomic_write(ModelFiles(out_dir).pseudo_selection, lambda tmp: chosen.to_parquet(tmp, index=False))
    return Finetuned(chosen, table, summary, alpha)

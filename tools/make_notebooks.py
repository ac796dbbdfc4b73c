"""Write notebooks/*.ipynb from one spec: `python tools/make_notebooks.py` (then commit them).

Each notebook's cell tagged `parameters` is generated from its step's Params class: the defaults,
with the comment its field carries in the source, so notebooks, the command line and params files
share one set of defaults (tests/test_notebooks.py checks it). The other cells are below, one list
per notebook: markdown says why, code cells only call cdkit."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdkit.base.params import defaults, field_comments  # noqa: E402
from cdkit.steps.pipeline import STEPS  # noqa: E402


def parameters_cell(cls) -> str:
    comments = field_comments(cls)
    lines = []
    for k, v in defaults(cls).items():
        c = comments.get(k, "")
        lines.append(f"{k} = {v!r}" + (f"  # {c}" if c else ""))
    return "\n".join(lines)


def md(text):
    return nbformat.v4.new_markdown_cell(text.strip())


def code(text, tags=None):
    c = nbformat.v4.new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = tags
    return c


def step_cell(module, cls, last, figures=True):
    "The cell that runs a step: its parameters validated by its Params class, run, recorded for the report, then `last`"
    imports = ["from cdkit.base.params import take_params", f"from cdkit.steps import {module} as step"]
    imports += ["from cdkit.steps.report import save_figure"] if figures else []
    return code("\n".join(imports) + f"\n\nP = take_params(step.{cls}, globals())\nR = step.run(P)\n"
                f"step.record(P.run_dir, R)\n{last}")


TRAIN_DOC = """
**Inputs**: `data_dir` (train.bson, category_names.csv) and `work_dir` (indices and the validation split of
step 02: run 02 first).

**Outputs** in `run_dir/models/<name>/`: `params.yaml` (effective parameters), `metrics.csv` (per epoch: losses,
image and product top-1, batch, lr), `checkpoints/last.pth` (exact resume with `resume = True`; a resume with
parameters that change the model or the data order is refused), `model.pth` + `model.json` (the model card that
step 06 reads), `lr_find.png`.

The defaults train briefly on the synthetic demo data, on a CPU, in minutes ({demo}). On GPUs and the
competition data: `papermill ... -f params/cdiscount.yaml -f params/{full}` (the kit's recipe).
"""

TRAIN_CELLS = [
    code("""
from cdkit.base.params import take_params
from cdkit.steps import train as step

P = step.effective(take_params(step.{cls}, globals()))  # unknown, mistyped or contradictory parameter: error here
P
"""),
    md("## The learner and an augmented training batch\n`step.setup` locks `models/<name>/` (a folder that holds a run "
       "is refused unless `resume` or `overwrite` is set), loads the data and builds the fastai learner; "
       "`S.learn` takes fastai's usual calls (`show_batch`, `lr_find`, `summary`, later `show_results`, `tta`, "
       "`predict`, `ClassificationInterpretation`). Labels are category ids."),
    code("S = step.setup(P)\nS.dls.show_batch(max_n=8, figsize=(8, 4))"),
    md("## Learning-rate finder\nRun before training when `lr_find = True` or `lr = 'find'` (then training uses its "
       "suggestion, fastai's `valley`, the dashed line)."),
    code("""
if (P.lr_find or P.lr == "find") and not S.resuming:
    print(f"suggested lr: {step.find_lr(S):.2e}" + (" (used)" if P.lr == "find" else f" (used: {P.lr:.2e})"))
"""),
    md("## Train\nCheckpoints after every epoch (and every `checkpoint_every` optimizer steps); the table is the last "
       "epoch's validation."),
    code("result = step.fit(S)\nstep.record(P.run_dir, result)\nresult.summary()"),
    md("## Loss and accuracy per epoch\nImage top-1 and product top-1 (mean of a product's picture probabilities) on the validation products."),
    code("step.plot_history(result.history, title=P.name);  # step.record saved it for the report\nresult.history"),
    md("## Predictions on validation pictures (fastai's `show_results`)"),
    code("result.learn.show_results(max_n=8, figsize=(8, 5))"),
    md("## Most confidently misclassified validation pictures"),
    code("step.show_misclassified(result, n=12);"),
    md("## What this shows"),
    code("print(step.what_this_shows(result))"),
]

SPEC = {
    "01_explore_data": [
        md("""
# 01 Explore the data

**Inputs:** `data_dir/train.bson`, `test.bson`, `category_names.csv` (the Kaggle download, or the synthetic
demo set, written here on first run when `synth_preset` is set).
**Outputs:** none besides this notebook: tables and plots of pictures per product, category frequencies,
hierarchy sizes, sample products, picture sizes and duplicate pictures.
"""),
        "PARAMS",
        code("""
from cdkit.base.params import take_params
from cdkit.steps import explore as step

P = take_params(step.ExploreParams, globals())
R = step.run(P)
print(R.index_summary)
"""),
        md("## Pictures per product and the long tail of categories"),
        code("R.pictures_per_product"),
        code("step.plot_overview(R.train_index, R.catalog);"),
        code("R.top_categories"),
        md("## The hierarchy"),
        code("R.hierarchy"),
        md("## Sample products (pictures side by side, level-1 / level-3 names)"),
        code("step.plot_product_grid(R.reader, R.train_index, R.catalog, n=P.n_grid_products, seed=P.seed);"),
        md("## Picture sizes and duplicate pictures (MD5)\nByte-identical pictures are what step 08's MD5 lookup exploits."),
        code("step.plot_picture_sizes(R.picture_stats);\nR.duplicates"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "02_prepare_data": [
        md("""
# 02 Prepare: index, validation split, class map

The only step that makes the validation split: every later step loads it, so every model is validated on the
same products (a later step without it stops and names this notebook).

**Inputs:** `data_dir/train.bson`, `test.bson`, `category_names.csv`.
**Outputs** (in `work_dir`): `train_index.parquet`, `test_index.parquet` (one row per product: id, category,
byte offset and length, pictures; rebuilt when their BSON file changes) and `split.parquet`.
"""),
        "PARAMS",
        code("""
from cdkit.base.params import take_params
from cdkit.steps import prepare as step

P = take_params(step.PrepareParams, globals())
R = step.run(P)
R.summary
"""),
        md("## The class map: category_id -> class index (sorted ids), with the hierarchy"),
        code("R.prep.catalog.table.assign(level1_idx=R.prep.catalog.level1, level2_idx=R.prep.catalog.level2).head()"),
        md("## Validation products per category (stratified)\nThe most frequent categories as bars, and every category's validation share against its size."),
        code("step.plot_split(R.prep);\nstep.per_category(R.prep).head(10)"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "03_train_resnet": [md("# 03 · Train ResNet-101 (SE-ResNet-50 with `arch = 'seresnet50'`)\n\nTrains one backbone with "
                           "`cdkit.steps.train`, the same function as `cdkit train --params FILE`.\n"
                           + TRAIN_DOC.format(demo="ResNet-18 at 64 px stands in for ResNet-101",
                                              full="resnet101_full.yaml")),
                        "PARAMS", *[code(c.source.replace("{cls}", "TrainParams")) if c.cell_type == "code" else c
                                    for c in TRAIN_CELLS]],
    "04_train_inception": [md("# 04 · Train Inception v3 (v4 with `arch = 'inception_v4'`)\n\nTrains one backbone with "
                              "`cdkit.steps.train`, the same function as `cdkit train --params FILE`.\n"
                              + TRAIN_DOC.format(demo="Inception v3 itself, at 75 px, its smallest input",
                                                 full="inception_v3_full.yaml")),
                           "PARAMS", *[code(c.source.replace("{cls}", "InceptionTrainParams")) if c.cell_type == "code"
                                       else c for c in TRAIN_CELLS]],
    "05_train_xception": [md("# 05 · Train Xception (timm's `legacy_xception`, Chollet's original)\n\nTrains one backbone "
                             "with `cdkit.steps.train`, the same function as `cdkit train --params FILE`.\n"
                             + TRAIN_DOC.format(demo="Xception itself, at 64 px and on part of the pictures",
                                                full="xception_full.yaml")),
                          "PARAMS", *[code(c.source.replace("{cls}", "XceptionTrainParams")) if c.cell_type == "code"
                                      else c for c in TRAIN_CELLS]],
    "06_predict_tta": [
        md("""
# 06 Predict every model with test-time augmentation

**Inputs:** `run_dir/models/<name>/` (steps 03-05), `work_dir` (step 02).
**Outputs:** `run_dir/preds/<name>_{valid,test}.store`: per picture the top-k classes of the original and
`n_tta` augmented views (seeded per picture: the same views whatever the batch or shard). A store is reused when
the same model file predicted it with the same settings. With `num_shards > 1` each machine writes its shard;
the last one merges them.
"""),
        "PARAMS",
        step_cell("predict", "PredictParams", "R.table"),
        md("## One view against all views, per model\nProduct accuracy, mean of the pictures' probabilities."),
        code("if R.complete:\n    save_figure(step.plot(R), P.run_dir, '06_tta_per_model')"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "06b_fusion_head": [
        md("""
# 06b Learned product-level fusion (the 2nd place's fuse net)

A product has 1 to 4 pictures; averaging their probabilities (or belief aggregation) cannot learn that the
first picture is usually the main photo, that a later one is a generic logo, or that the pattern shows on one
picture and the outline on another. A small network over the pooled features of a product's pictures can:
dropout, a squeeze-excitation gate, a projection, max / sum / mean over the real pictures (padding masked), an
MLP to the classes. It trains on the **fusion split** (train products that no backbone trained on, step 02's
`fusion_frac`), so the features it sees are not overfit, and validates on the validation products.
Two variants: **order-aware** (a position embedding and the main photo's own vector) and **order-invariant**;
each with several seeds, whose spread the report gives. `order = 'auto'` keeps the variant better on validation.

**Inputs:** `run_dir/preds/<model>_{fusion,valid,test}.features` (step 06 with `features = True`).
**Outputs:** `run_dir/models/<model>-fusion/` (heads, per-epoch logs, checkpoints, `fusion.json`) and
`run_dir/preds/<model>-fusion_{valid,test}.store`: the seeds' heads averaged, one row per picture carrying the
product's distribution, so the member enters the ensemble (07) and the aggregation (08) like any other.
"""),
        "PARAMS",
        step_cell("fuse", "FuseParams", "R.table.round(4)"),
        md("## Each backbone's pictures (mean aggregation) against one fusion head (mean and sd over seeds)"),
        code("save_figure(step.plot(R), P.run_dir, '06b_fusion')\nR.spread().round(4)"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "07_ensemble": [
        md("""
# 07 Ensemble the models

**Inputs:** `run_dir/preds/<model>_{valid,test}.store` (step 06), `work_dir` (validation labels).
**Outputs:** `run_dir/preds/ensemble-<stage>_{valid,test}.store`: one distribution per picture, the weighted mean
(or geometric / power mean) over models and TTA views, weights fitted on the validation pictures.
"""),
        "PARAMS",
        step_cell("ensemble", "EnsembleParams", "R.weights.to_frame()"),
        md("## Each member (all its views) against the ensemble: product accuracy, mean aggregation"),
        code("save_figure(step.plot(R), P.run_dir, '07_ensemble')\nR.table"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "08_belief_aggregation": [
        md("""
# 08 From pictures to products: mean vs belief-based aggregation, then MD5

**Inputs:** the ensemble stores of 07 (`rows="pictures"`) or the members' stores of 06 (`rows="all"`: every
picture x model x view, as the study words it), `work_dir`, `train.bson`/`test.bson` (MD5 lookup).
**Outputs:** `run_dir/products/<stage>_{valid,test}.parquet` from the method better on validation (or the one
asked for), then the MD5 lookup: pictures byte-identical to train pictures, and whole products whose set of
pictures equals a train product's, take the train labels. The lookup comes after aggregation because belief
aggregation would exclude the one-hot train labels as outliers.

Belief aggregation comes in three named settings (`belief`; docs/STUDY.md): `poster`, the rule as the study
prints it (each prediction's top class a candidate, a prediction outside the 95% interval of the product's
other predictions excluded, the rest summed); `authors`, as their code ran it (excluded below half or above
twice the others' mean, the mean of the kept scored, the plain mean when none is kept); `kit` (the
default), the settings `m`, `z`, `rule`, `score`, `min_preds`, `ddof`, `atol`, `all_excluded` as given.
"""),
        "PARAMS",
        code("""
from cdkit.base.params import take_params
from cdkit.data.prepare import load_prepared
from cdkit.steps import aggregate as step
from cdkit.steps.report import save_figure

P = take_params(step.AggregateParams, globals())
prep = load_prepared(P.data_dir, P.work_dir)
R = step.start(P, prep)  # the stores to aggregate, valid and test checked to be one pair; the MD5 lookup (P.md5)
"""),
        md("""
## 1. Mean aggregation

A product's prediction is the mean of its rows' probabilities (one row per picture, or per picture x model x
view with `rows="all"`), the baseline every other method is compared with.
"""),
        code("step.mean(R)\nstep.plot_by_pictures(R)"),
        md("""
**Look for:** accuracy by pictures per product. More pictures give the mean more evidence, but also more
chances to be pulled off by one misleading picture (a logo, a box, an accessory): where products of 3-4
pictures do no better than products of 1-2, single pictures are outvoting the rest, which is what belief
aggregation addresses. The numbers:
"""),
        code('print(step.finding(R, "mean"))'),
        md("""
## 2. Belief aggregation

The same rows; a row far outside the product's other rows for a candidate class (`rule`, `z`, `atol`) is
excluded from that candidate's score.
"""),
        code("step.belief(R)\nstep.plot_by_pictures(R)"),
        md("""
**Look for:** the belief bars against the mean bars. A row is excluded only where a product has at least
`min_preds` rows, so a gain, if any, sits at the products with many pictures. Few products change their
winner: the difference against the mean is the net of those few.
"""),
        code('print(step.finding(R, "belief"))'),
        md("""
### Products in which belief aggregation excluded a picture (red: excluded for the winning class)

**Look for:** whether the red pictures are the odd ones out of their product (another object, a logo, a
placeholder); a red picture that shows the product itself is an exclusion that cost evidence.
"""),
        code("fig = step.plot_excluded(R, 'test', n=P.n_grid)\nif fig is not None:\n"
             "    save_figure(fig, P.run_dir, '08_excluded_pictures', dpi=60)\nfig"),
        md("""
## 3. Re-ranker (second level)

LightGBM over the candidates of mean, belief and each member's own products, with picture-position and MD5
features; fitted on validation out of fold, once per seed in `rerank_seeds`, the seeds' probabilities averaged
(nothing happens with `rerank=False`). Each seed's accuracy:
"""),
        code("step.rerank(R)\nR.rerank_seeds"),
        md("""
**Look for:** the gain over the mean against the spread between seeds: a gain smaller than the seeds' spread
is noise. Its validation figure is out of fold, so it compares with the others as it stands.
"""),
        code('print(step.finding(R, "rerank"))'),
        md("""
## 4. The method kept

`method="auto"` keeps for test the method better on validation and, for each fold of validation products, the
one better on the other folds, so that the final validation figure stays out of fold (ties: the simpler).
"""),
        code('step.choose(R)\nprint(step.finding(R, "choose"))'),
        md("""
## 5. MD5 lookup, after aggregation

Products with pictures byte-identical to train pictures take those pictures' train labels (decisive matches
only, `md5_min_share`), whole product sets last (`md5_products`). What it matched on each split:
"""),
        code("step.md5(R)\n{split: s.__dict__ for split, s in R.md5.items()}"),
        md("""
**Look for:** `changed` against `products`: a product matched but not changed was already right (or the
lookup agreed with it). On validation the lookup sees only the train products outside validation, so the
change in validation accuracy below estimates what it adds on test.
"""),
        code('print(step.finding(R, "md5"))'),
        md("## 6. The products written, every method's accuracy, the report's rows"),
        code("R = step.finish(R)\nstep.record(P.run_dir, R)\nR.accuracy"),
        md("## Accuracy by number of pictures per product"),
        code("if len(R.by_pictures):\n    save_figure(step.plot_by_pictures(R), P.run_dir, '08_accuracy_by_pictures')\n"
             "R.by_pictures.pivot_table(index=['split', 'n_pictures'], columns='method', values='accuracy') if len(R.by_pictures) else R.by_pictures"),
        md("## Accuracy at each level of the hierarchy"),
        code("R.by_level.pivot_table(index='level', columns=['split', 'method'], values='accuracy') if len(R.by_level) else R.by_level"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "09_pseudo_label_finetune": [
        md(r"""
# 09 · Pseudo-label fine-tuning, fed back into the final predictions

Fine-tunes a trained model on labeled train pictures plus test pictures labeled by the kit's best product
predictions (Lee, 2013), the study's last step (its test figures: docs/STUDY.md):

$$L = \frac{1}{n}\sum_i CE(y_i, l_i) + \alpha(t)\,\frac{1}{n'}\sum_i CE(y'_i, l'_i)$$

with $\alpha(t)$ in one of three published forms (`alpha_form`; docs/STUDY.md gives their sources):

| `alpha_form` | $t < T_1$ | between $T_1$ and $T_2$ | after $T_2$ |
| --- | --- | --- | --- |
| `lee` (Lee 2013; the default) | $0$ | $a_f\,\frac{t - T_1}{T_2 - T_1}$ | $a_f$ |
| `poster` (the study as printed) | $0$ | $\frac{t - T_1}{T_2 - T_1}$, reaching 1 at $T_2$ | $a_f$ |
| `authors` (the study's code, `StepAlpha`) | $\alpha_{min}$ | $a_f\,t / T_2$ | $a_f$ |

The study's file (`params/study_pseudo.yaml`) runs `authors`, with $a_f = 2$, $\alpha_{min} = 0.5$, $T_1 = 0.5$,
$T_2 = 2$ epochs, the only form published with numbers. The optimizer and schedule are the training step's
parameters (`optimizer`, `momentum`, `one_cycle`, `lr_steps`, ...): Adam with one cycle by default, the
authors' SGD with a stepped lr in the study's file.

Labels come from step 08's final products (`labels_from = 'products'`: ensemble, TTA, aggregation and MD5) or
from the base model alone (`'model'`). The fine-tuned model then takes its base model's place and steps 06-08
run again with their own settings as stage `pseudo`: its products are what step 10 may submit.

**Inputs**: steps 02-08 in `run_dir`. **Outputs**: `run_dir/models/<name>/` (model, `selection.parquet`,
`alpha.csv`), its stores, `preds/ensemble-pseudo_*.store`, `products/pseudo_{valid,test}.parquet`.
"""),
        "PARAMS",
        step_cell("pseudo", "PseudoParams", "R.selection_summary.round(4)"),
        md("## The final predictions before and after\nStage `base` (step 08) against stage `pseudo` (the same steps with the fine-tuned model)."),
        code("R.aggregate.accuracy"),
        code("print('products whose final prediction changed:', R.changed)\nR.single_model"),
        md("## alpha(t) as applied\nThe weight of the pseudo-label loss at every training step, with the two parts' cross entropies."),
        code("save_figure(step.plot_alpha(R.alpha), P.run_dir, '09_alpha')\nR.alpha[['n_labeled', 'n_pseudo']].agg(['min', 'max', 'sum'])"),
        md("## Selection per category\nMost chosen first; precision where the truth is known (synthetic data)."),
        code("R.selection_table.sort_values('chosen', ascending=False).head(20).round(3)"),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
    "10_submit": [
        md("""
# 10 Submission

**Inputs:** `run_dir/products/{base,pseudo}_{valid,test}.parquet` (steps 08 and 09): with `source = 'auto'` the
stage more accurate on the validation products; `data_dir/sample_submission.csv`, `category_names.csv`.
**Outputs:** `run_dir/submission.csv.gz`, validated before it is written. With `submit = True` it is sent with the
Kaggle API; credentials come from the kaggle package and are never printed.
"""),
        "PARAMS",
        code("""
from cdkit.base.params import take_params
from cdkit.steps import submit as step

P = take_params(step.SubmitParams, globals())
R = step.run(P)
step.record(P.run_dir, R)
print(f"{R.path}: {R.rows:,} products from stage {R.stage!r}, {R.n_filled} filled with the fallback")
R.submission.head()
"""),
        md("## What this shows"),
        code("print(step.what_this_shows(R))"),
    ],
}


def build(step) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    cells = []
    for c in SPEC[step.notebook]:
        cells.append(code(parameters_cell(step.params_class()), tags=["parameters"]) if c == "PARAMS" else c)
    nb.cells = cells
    for i, c in enumerate(nb.cells):
        c["id"] = f"{step.notebook.split('_')[0]}-{i:02d}"
    return nb


def main():
    for s in STEPS:
        path = ROOT / "notebooks" / f"{s.notebook}.ipynb"
        nbformat.write(build(s), path)
        print("wrote", path)


if __name__ == "__main__":
    main()

"""Which method takes the scene shortcut out? Biased and unbiased accuracy on the synthetic data, per setting.

Trains the demo model (``configs/synthetic.yaml``: ``TwoStreamHost`` with two ``small_cnn`` streams, ``d_h = 128``,
N = 32 prototypes of 256-dim ``test_efficientnet`` scene features, 4 epochs of AdamW) on
``SyntheticContextDataModule`` and tests the final-epoch weights on a biased test set (the training distribution)
and an unbiased one (scene and emotion independent), 5,000 samples each.

``--ccim-checkpoint`` adds the row ``ccim_fit`` for the seed the checkpoint was trained with: a ``ccim fit --config
configs/synthetic.yaml`` checkpoint, checked to be trained as ``ccim_dot`` is (its hyper-parameters and its run's
``config.yaml``) and tested on the same test sets, not trained again (``checkpoint.py``); with ``--quick`` it
takes ``ccim_dot``'s place, which is how ``make demo`` reuses its own fit.

Rows (``--list`` prints them): the baseline (``attention="none"``); CCIM with dot-product and additive attention;
the paper's four ablations (random Z, without lambda = uniform attention, without P(z), dictionary from unmasked
images); each method of ``ccim_lightning.debias`` on the baseline head and on CCIM; the **oracle** (the baseline
trained on bias-0 data, tested on the same two test sets); a bias sweep of the baseline, CCIM and the best method.
The per-method hyper-parameters are in ``METHODS`` (and in each row's description).

Method:
    * Seed ``s`` sets everything of a run: the data (``SyntheticContextDataModule(seed=s)``), the initialisation and
      batch order (``seed_everything(s)``) and the k-means seed. Runs of one seed share their test samples, so every
      comparison is paired by seed and by test sample.
    * Each split is rendered once into memory per process (``RenderedSplit``: the datamodule's samples, its random
      flips for training).
    * The confounder dictionary of (seed, training bias, N, masking) is built once by ``DictionaryRecipe`` before
      the run that first needs it and written to ``<out>/cache/``; the runs' ``ConfounderDictionaryCallback`` reads
      it from there (``cache=``), so a built and a cached dictionary give the same training.
    * CPU, 1 torch thread per run (``--jobs`` deals the runs out to parallel processes), no validation loop, no
      checkpoints, no logger; accuracy is counted per test sample from ``model(batch)`` (which applies a debiasing
      method's inference rule, e.g. CLEF's TIE).
    * Each run appends one JSON line to ``<out>/debias_runs.jsonl``: configuration, seed, ``biased_acc``,
      ``unbiased_acc``, the per-sample correctness (for the bootstrap), the command that reproduces it. The report
      (``report.py``: table with paired-bootstrap 95% intervals, plots) is rebuilt from those lines.

``--task caers_like|emotic_like|continuous`` runs the same study on the generator's tasks shaped like CAER-S (7
emotions, 16 scenes), EMOTIC (26 long-tailed, co-occurring categories, multilabel; the metric is macro mAP and the
bootstrap recomputes it per resample) and on continuous scenes (``tasks.py``): the rows baseline, ``ccim_dot``,
each method (baseline head and CCIM) and the oracle, in a scratch folder unless ``--out`` names another.

Modules, one job each: ``settings`` (the rows), ``tasks`` (the ``--task`` overrides), ``data`` (the splits,
rendered once), ``runs`` (one run and its record), ``multilabel`` (scores and mAP of multilabel runs),
``checkpoint`` (the ``--ccim-checkpoint`` checks), ``report`` (bootstrap, table, plots), ``cli`` (the command line,
which ``__main__`` runs).

Example:
    python -m benchmarks.debias --out /tmp/debias --resume --jobs 2   # full run
    python -m benchmarks.debias --quick                              # 1 seed, 4 rows, in a new scratch folder
    python -m benchmarks.debias --quick --test-size 1000 --ccim-checkpoint runs/demo/.../last.ckpt   # make demo
    python -m benchmarks.debias --report-only                        # rebuild debias.md and plots from the JSON lines
    python -m benchmarks.debias --only reweight --seeds 1 --out /tmp/debias   # one row, one seed
    python -m benchmarks.debias --task emotic_like --quick --jobs 2             # 1 seed, 4 rows, EMOTIC-shaped
"""

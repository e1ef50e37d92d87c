"""The labeling workflow: people label items, genloop makes training data of the labels.

    tasks.py      a task (kind, label set, source) and its items, from a dataset version
                  or a JSON Lines file; what a label value must look like
    prelabel.py   model-assisted pre-labels: a classifier's prediction, a generator's text,
                  two generations to choose between
    queue.py      the next item for an annotator, submitting a label (once per person and
                  item), progress
    agreement.py  Cohen's kappa between two annotators; the majority rule that settles an
                  item's labels
    export.py     labeled items → a dataset version (classification, token_classification,
                  sft or dpo) with lineage, ready for ``genloop train``

Kinds of task: ``classification`` (one label of the label set per text), ``spans`` (one
label per token; ``O`` is outside every span), ``caption`` (edit a text or a caption) and
``preference`` (choose between two generations A and B). It sits with feedback because it
is the same loop: human judgement on text turned into a dataset version that retrains a
model; the layer (above models, train and evaluate) lets pre-labels run models in process.
"""

"""Your own images: a folder with images, optional saliency maps and a CSV (see the README), one method.

    saljax train --config experiments/configs/folder.py:gradmask --workdir runs/mine dataset.manual_dir=my_data

The argument is any `saljax.losses.for_method` name (default gradmask). Nothing else needs to be
set: the class names come from the CSV's labels, the channels and image size from the images, the
model's classes, channels and input size from the data. Explicit fields win, e.g.
`dataset.overrides.image_size=64`, `model.name='resnet18'`, `loss.lam=10.0`; after editing the CSV,
pass `dataset.rebuild=True`. Then explain the trained model:

    saljax explain --checkpoint runs/mine --out runs/mine/explain
"""

import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.dataset = ml_collections.ConfigDict({"name": "saliency_folder", "config": "csv"})
    c.model = ml_collections.ConfigDict({"name": "simple_cnn"})
    c.method = arg or "gradmask"
    c.optimizer = ml_collections.ConfigDict({"name": "adam", "learning_rate": 1e-3})
    c.batch_size = 32
    c.num_steps = 500
    c.eval_every = 100
    return c

"""Training: jit-compiled steps, optax optimizers, the training loop and its checkpoints.

    model_def, state = init_train_state(model, optimizer)
    train_step = make_train_step(model_def, losses.for_method("gradmask", lam=1.0), optimizer)
    state, metrics = train_step(state, batch)

    results = train_and_evaluate(config, workdir)     # `saljax train`
    results = train_many(configs, workdirs)           # seeds (or a loss option's values) as one program
    model, config = load_model(workdir)               # its best checkpoint

Modules: `state` (ModelDef, TrainState), `steps` (train and eval steps), `optimizer` (optax
optimizers and schedules of a config), `from_config` (config checks, model from a config), `loop`
(the training loop), `many` (runs of several seeds as one vmapped program), `restore` (a run's model).
"""

from saljax.train.from_config import check_config, fill_from_dataset, init_from_config, make_loss
from saljax.train.loop import train_and_evaluate
from saljax.train.many import make_many_eval_step, make_many_train_step, stacking, train_many
from saljax.train.optimizer import OPTIMIZERS, SCHEDULES, make_optimizer, make_schedule
from saljax.train.restore import load_model
from saljax.train.state import ModelDef, TrainState, init_train_state, merge, with_loss_state
from saljax.train.steps import evaluate, make_eval_step, make_train_step

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "ModelDef",
    "TrainState",
    "check_config",
    "evaluate",
    "fill_from_dataset",
    "init_from_config",
    "init_train_state",
    "load_model",
    "make_eval_step",
    "make_loss",
    "make_many_eval_step",
    "make_many_train_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "merge",
    "stacking",
    "train_and_evaluate",
    "train_many",
    "with_loss_state",
]

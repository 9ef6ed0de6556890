"""Federated learning as `jit(vmap(client_update))` over stacked cohorts.

    pool = ClientPool.from_dataset(train_ds)
    ids = sample_clients(key, pool.sizes, cohort_size=100, weighted=False)
    cohort = gather_cohort(train_ds, ids, max_examples=64, key=key, pool=pool)
    algorithm = fedavg(classification_loss(model), optax.sgd(0.1),
                       LocalConfig(batch_size=16, num_epochs=1))
    state = algorithm.init(params, model_state)
    state, metrics = algorithm.apply(state, cohort, ids, key)

Modules: `cohort` (sampling and padding clients), `client` (the local
update), `rounds` (one round: faults, transform and aggregator hooks),
`execution` (vmap / chunked / sharded), `server_optimizers` (Reddi et al.
2021), `algorithms` (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad,
SCAFFOLD), `aggregators`, `compression`, `privacy` (DP-FedAvg),
`secure_aggregation`, `training` (a run's parts from its config),
`federated_loop` (the per-round step of `ondevice.loop`), `experiment` (the
config-driven run), `report` (its final metrics and plot), `fedjax_interop`
(a `fedjax.FederatedData` as a client source), `codes` (BCH codes) and
`verification` (FedUV: user verification without sharing embeddings).
"""
from fedjax_ext.algorithms import ALGORITHMS
from fedjax_ext.algorithms import fedadagrad
from fedjax_ext.algorithms import fedadam
from fedjax_ext.algorithms import FederatedAlgorithm
from fedjax_ext.algorithms import fedavg
from fedjax_ext.algorithms import fedavgm
from fedjax_ext.algorithms import fedopt
from fedjax_ext.algorithms import fedprox
from fedjax_ext.algorithms import fedyogi
from fedjax_ext.algorithms import scaffold
from fedjax_ext.algorithms import ScaffoldState
from fedjax_ext.algorithms import ServerState
from fedjax_ext.client import ClientOutput
from fedjax_ext.client import LocalConfig
from fedjax_ext.client import make_client_update
from fedjax_ext.cohort import ClientPool
from fedjax_ext.cohort import gather_cohort
from fedjax_ext.cohort import sample_clients
from fedjax_ext.cohort import stack_clients
from fedjax_ext.execution import ExecutionConfig
from fedjax_ext.execution import resolved_choices
from fedjax_ext.fedjax_interop import as_loss_fn
from fedjax_ext.fedjax_interop import bridge_fedjax_model
from fedjax_ext.fedjax_interop import FederatedDataSource
from fedjax_ext.fedjax_interop import FedjaxModelBridge
from fedjax_ext.fedjax_interop import import_fedjax
from fedjax_ext.fedjax_interop import to_haiku_params
from fedjax_ext.rounds import client_part
from fedjax_ext.rounds import finish_round
from fedjax_ext.rounds import RoundConfig
from fedjax_ext.rounds import run_round
from fedjax_ext.rounds import split_round
from fedjax_ext.rounds import weighted_mean
from fedjax_ext.server_optimizers import adaptive_server_optimizer

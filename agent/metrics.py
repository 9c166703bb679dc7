"""Prometheus metrics of one agent, built on a registry the caller owns.

:func:`build_metrics` creates every metric on a given ``CollectorRegistry`` (one per
:class:`~agent.agent.Agent`; tests use a fresh one, so nothing leaks between agents) and returns
them as attributes of a :class:`Metrics` object. Naming follows the Prometheus conventions:
the ``metaagent_`` prefix, base units in the name (``_seconds``, ``_bytes``, ``_ratio``),
counters ending ``_total``, and labels only from small closed sets (algorithm, outcome, error
code, reason). Task ids never become labels.

Label sets that are known up front (error codes, outcomes, rollback reasons) are created at
zero, so dashboards and rate() see a series before the first event.

Examples
--------
>>> from prometheus_client import CollectorRegistry, generate_latest
>>> reg = CollectorRegistry()
>>> m = build_metrics(reg, algorithms=["maml"])
>>> m.tasks.labels(algorithm="maml", outcome="answered").inc()
>>> reg.get_sample_value("metaagent_tasks_total", {"algorithm": "maml", "outcome": "answered"})
1.0
>>> reg.get_sample_value("metaagent_input_errors_total", {"code": "bad_json"})
0.0
>>> m.state.state("running")
>>> reg.get_sample_value("metaagent_agent_state", {"metaagent_agent_state": "running"})
1
>>> b"metaagent_build_info" in generate_latest(reg)
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info

__all__ = ["PREFIX", "OUTCOMES", "ACTIONS", "STAGES", "DRIFT_SIGNALS", "STATES", "ROLLBACK_REASONS", "EXPIRY_REASONS", "INTERNAL_ERROR", "Metrics",
           "build_metrics"]

PREFIX = "metaagent_"
OUTCOMES = ("answered", "diverged", "error")  # per task at prediction time
STATES = ("starting", "running", "draining", "stopped")
ROLLBACK_REASONS = ("nonfinite_loss", "grad_norm", "nonfinite_params")
EXPIRY_REASONS = ("ttl", "capacity")
ACTIONS = ("none", "escalate", "switch", "fallback", "abstain")  # failure-predictor decisions applied
STAGES = ("pre", "post")  # failure-predictor stages
DRIFT_SIGNALS = ("quality", "failure")
INTERNAL_ERROR = "internal"  # error label for a failure of the agent itself (not of the input)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)
_STEP_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50, 100)
_MEMBER_BUCKETS = (1, 2, 3, 4, 6, 8, 16)
_RATIO_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
_MSE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 50.0)


@dataclass
class Metrics:
    """The agent's metrics (see :func:`build_metrics` for names and meanings)."""

    registry: CollectorRegistry
    tasks: Counter
    input_errors: Counter
    adapt_seconds: Histogram
    task_seconds: Histogram
    inner_steps: Histogram
    ensemble_members: Histogram
    budget_tokens: Gauge
    budget_capped: Counter
    labelled: Counter
    failures: Counter
    query_accuracy: Histogram
    query_mse: Histogram
    p_fail: Histogram
    memory_entries: Gauge
    memory_capacity: Gauge
    memory_bytes: Gauge
    memory_hits: Counter
    memory_retrieval_seconds: Histogram
    online_updates: Counter
    online_rollbacks: Counter
    online_loss: Gauge
    checkpoint_seconds: Histogram
    checkpoint_last_success: Gauge
    checkpoint_failures: Counter
    feedback_pending: Gauge
    feedback_joined: Counter
    feedback_unmatched: Counter
    feedback_expired: Counter
    build_info: Info
    state: Enum
    failure_predictions: Counter = None  # type: ignore[assignment]
    failure_predictor_rocauc: Gauge = None  # type: ignore[assignment]
    failure_predictor_logloss: Gauge = None  # type: ignore[assignment]
    failure_predictor_brier: Gauge = None  # type: ignore[assignment]
    decisions: Counter = None  # type: ignore[assignment]
    selector_pulls: Counter = None  # type: ignore[assignment]
    selector_reward: Gauge = None  # type: ignore[assignment]
    selector_counterfactual_steps: Counter = None  # type: ignore[assignment]
    drift_events: Counter = None  # type: ignore[assignment]
    experiment_samples: Gauge = None  # type: ignore[assignment]
    experiment_p_value: Gauge = None  # type: ignore[assignment]
    experiment_effect: Gauge = None  # type: ignore[assignment]
    experiment_winner: Gauge = None  # type: ignore[assignment]


def build_metrics(registry: CollectorRegistry, *, algorithms: Iterable[str] = (), version: str | None = None,
                  arms: Iterable[str] = (), detectors: Mapping[str, str] | None = None,
                  experiments: Mapping[str, Sequence[str]] | None = None) -> Metrics:
    """Create the agent's metrics on ``registry``.

    Parameters
    ----------
    registry
        Where the metrics live (one per agent).
    algorithms
        Algorithm names the agent may use: their series are created at zero.
    version
        For ``metaagent_build_info`` (default: the package version).
    arms
        Selector arm labels (``"algorithm@steps"``, a closed set from the config).
    detectors
        ``{signal: detector name}`` of the drift monitor (``quality``, ``failure``).
    experiments
        ``{experiment name: variant names}`` from the config.

    Returns
    -------
    Metrics
        ``tasks`` (``metaagent_tasks_total{algorithm,outcome}``), ``input_errors``
        (``metaagent_input_errors_total{code}``), ``adapt_seconds`` /
        ``task_seconds`` (``metaagent_adapt_duration_seconds`` /
        ``metaagent_task_duration_seconds`` by algorithm), ``inner_steps``
        (``metaagent_inner_steps``), ``ensemble_members`` (``metaagent_ensemble_members``),
        ``budget_tokens`` (``metaagent_budget_tokens``), ``budget_capped``
        (``metaagent_budget_capped_total``), ``labelled`` / ``failures``
        (``metaagent_labelled_tasks_total`` / ``metaagent_task_failures_total`` by algorithm),
        ``query_accuracy`` (``metaagent_query_accuracy_ratio``), ``query_mse``
        (``metaagent_query_mse``), ``p_fail`` (``metaagent_predicted_failure_probability``),
        ``memory_*`` (``metaagent_memory_entries``, ``_capacity_entries`` (the configured
        ``memory.capacity``, 0 with memory disabled), ``_bytes``, ``_hits_total``,
        ``_retrieval_duration_seconds``), ``online_updates`` / ``online_rollbacks{reason}`` /
        ``online_loss`` (``metaagent_online_updates_total``, ``metaagent_online_rollbacks_total``,
        ``metaagent_online_meta_loss``), ``checkpoint_*`` (``metaagent_checkpoint_duration_seconds``,
        ``metaagent_checkpoint_last_success_timestamp_seconds``,
        ``metaagent_checkpoint_failures_total``), ``feedback_*`` (``metaagent_feedback_pending``,
        ``_joined_total``, ``_unmatched_total``, ``_expired_total{reason}``), ``build_info``
        (``metaagent_build_info``) and ``state`` (``metaagent_agent_state``).

        Online intelligence: ``failure_predictions``
        (``metaagent_failure_predictions_total{predicted,actual}``: the confusion counts of
        ``p_fail >= 0.5`` against the labelled outcome), ``failure_predictor_rocauc`` /
        ``_logloss`` / ``_brier`` (``metaagent_failure_predictor_rocauc{stage}`` etc.: rolling
        quality of the pre and post stages), ``decisions`` (``metaagent_decisions_total{action}``:
        actions applied), ``selector_pulls`` (``metaagent_selector_pulls_total{arm}``),
        ``selector_reward`` (``metaagent_selector_mean_reward{arm}``),
        ``selector_counterfactual_steps``
        (``metaagent_selector_counterfactual_inner_steps_total{arm}``: learning compute spent
        evaluating the arms that did not answer a labelled task, ``selector.counterfactual``), ``drift_events``
        (``metaagent_drift_events_total{signal,detector}``) and per experiment and variant
        ``metaagent_experiment_samples``, ``_p_value``, ``_effect`` (variant minus control) and
        ``_winner`` (1 for the declared winner).
    """
    from agent.task import ERROR_CODES

    if version is None:
        from agent import __version__ as version
    algorithms = list(dict.fromkeys(algorithms))
    r = dict(registry=registry)
    p = PREFIX
    alg = ["algorithm"]
    m = Metrics(
        registry=registry,
        tasks=Counter(p + "tasks", "Tasks handled, by algorithm and outcome.", ["algorithm", "outcome"], **r),
        input_errors=Counter(p + "input_errors", "Records rejected, by error code.", ["code"], **r),
        adapt_seconds=Histogram(p + "adapt_duration_seconds", "Adaptation time per task.", alg,
                                buckets=_LATENCY_BUCKETS, **r),
        task_seconds=Histogram(p + "task_duration_seconds", "End-to-end time per task, receipt to answer.", alg,
                               buckets=_LATENCY_BUCKETS, **r),
        inner_steps=Histogram(p + "inner_steps", "Inner steps spent per task (all members, backtracks included).",
                              alg, buckets=_STEP_BUCKETS, **r),
        ensemble_members=Histogram(p + "ensemble_members", "Ensemble members per task.", buckets=_MEMBER_BUCKETS, **r),
        budget_tokens=Gauge(p + "budget_tokens", "Inner-step units left in the compute token bucket.", **r),
        budget_capped=Counter(p + "budget_capped", "Tasks whose budget the token bucket lowered.", **r),
        labelled=Counter(p + "labelled_tasks", "Tasks scored against their labels.", alg, **r),
        failures=Counter(p + "task_failures", "Scored tasks that failed (see online.fail_threshold).", alg, **r),
        query_accuracy=Histogram(p + "query_accuracy_ratio", "Query accuracy of classification tasks.", alg,
                                 buckets=_RATIO_BUCKETS, **r),
        query_mse=Histogram(p + "query_mse", "Query mean squared error of regression tasks.", alg,
                            buckets=_MSE_BUCKETS, **r),
        p_fail=Histogram(p + "predicted_failure_probability", "Predicted failure probability per task.",
                         buckets=_RATIO_BUCKETS, **r),
        memory_entries=Gauge(p + "memory_entries", "Entries in the episodic memory.", **r),
        memory_capacity=Gauge(p + "memory_capacity_entries",
                              "Configured capacity of the episodic memory in entries (0: memory disabled).", **r),
        memory_bytes=Gauge(p + "memory_bytes", "Bytes held by the episodic memory's arrays.", **r),
        memory_hits=Counter(p + "memory_hits", "Memory neighbours used as ensemble initialisations.", **r),
        memory_retrieval_seconds=Histogram(p + "memory_retrieval_duration_seconds", "k-NN lookup time.",
                                           buckets=_FAST_BUCKETS, **r),
        online_updates=Counter(p + "online_updates", "Online meta-parameter updates applied.", **r),
        online_rollbacks=Counter(p + "online_rollbacks", "Online updates rolled back, by reason.", ["reason"], **r),
        online_loss=Gauge(p + "online_meta_loss", "Meta-loss of the last online update batch.", **r),
        checkpoint_seconds=Histogram(p + "checkpoint_duration_seconds", "Time to write a checkpoint.",
                                     buckets=_LATENCY_BUCKETS, **r),
        checkpoint_last_success=Gauge(p + "checkpoint_last_success_timestamp_seconds",
                                      "Unix time of the last successful checkpoint.", **r),
        checkpoint_failures=Counter(p + "checkpoint_failures", "Checkpoints that failed to write.", **r),
        feedback_pending=Gauge(p + "feedback_pending", "Answered tasks waiting for their labels.", **r),
        feedback_joined=Counter(p + "feedback_joined", "Feedback records joined to a pending task.", **r),
        feedback_unmatched=Counter(p + "feedback_unmatched", "Feedback records for no pending task.", **r),
        feedback_expired=Counter(p + "feedback_expired", "Pending tasks dropped before feedback came, by reason.",
                                 ["reason"], **r),
        build_info=Info(p + "build", "Version of the agent.", **r),
        state=Enum(p + "agent_state", "Lifecycle state of the agent.", states=list(STATES), **r),
    )
    stage, arm, exv = ["stage"], ["arm"], ["experiment", "variant"]
    m.failure_predictions = Counter(p + "failure_predictions", "Labelled tasks by predicted (p_fail >= 0.5) and actual failure.",
                                    ["predicted", "actual"], **r)
    m.failure_predictor_rocauc = Gauge(p + "failure_predictor_rocauc", "Rolling ROC AUC of the failure predictor.", stage, **r)
    m.failure_predictor_logloss = Gauge(p + "failure_predictor_logloss", "Rolling log loss of the failure predictor.", stage, **r)
    m.failure_predictor_brier = Gauge(p + "failure_predictor_brier", "Rolling Brier score of the failure predictor.", stage, **r)
    m.decisions = Counter(p + "decisions", "Failure-predictor actions applied, by action.", ["action"], **r)
    m.selector_pulls = Counter(p + "selector_pulls", "Arms chosen by the selector.", arm, **r)
    m.selector_reward = Gauge(p + "selector_mean_reward", "Mean reward (quality - lambda * compute) per arm.", arm, **r)
    m.selector_counterfactual_steps = Counter(
        p + "selector_counterfactual_inner_steps", "Inner steps spent evaluating arms that did not answer a labelled "
        "task (selector learning compute, never in a reward).", arm, **r)
    m.drift_events = Counter(p + "drift_events", "Drifts detected, by signal and detector.", ["signal", "detector"], **r)
    m.experiment_samples = Gauge(p + "experiment_samples", "Observations per experiment variant.", exv, **r)
    m.experiment_p_value = Gauge(p + "experiment_p_value", "Always-valid p-value of a variant against the control.", exv, **r)
    m.experiment_effect = Gauge(p + "experiment_effect", "Variant mean minus control mean.", exv, **r)
    m.experiment_winner = Gauge(p + "experiment_winner", "1 for the declared winner of an experiment, else 0.", exv, **r)
    for st in STAGES:
        for g in (m.failure_predictor_rocauc, m.failure_predictor_logloss, m.failure_predictor_brier):
            g.labels(stage=st).set(float("nan"))
    for pred in ("true", "false"):
        for act in ("true", "false"):
            m.failure_predictions.labels(predicted=pred, actual=act)
    for a in ACTIONS:
        m.decisions.labels(action=a)
    for a in dict.fromkeys(arms):
        m.selector_pulls.labels(arm=a)
        m.selector_reward.labels(arm=a).set(float("nan"))
        m.selector_counterfactual_steps.labels(arm=a)
    for signal, det in (detectors or {}).items():
        m.drift_events.labels(signal=signal, detector=det)
    for name, variants in (experiments or {}).items():
        for v in variants:
            m.experiment_samples.labels(experiment=name, variant=v).set(0)
            m.experiment_winner.labels(experiment=name, variant=v).set(0)
            m.experiment_p_value.labels(experiment=name, variant=v).set(1.0)
            m.experiment_effect.labels(experiment=name, variant=v).set(float("nan"))
    m.build_info.info({"version": str(version)})
    for code in (*ERROR_CODES, INTERNAL_ERROR):
        m.input_errors.labels(code=code)
    for reason in ROLLBACK_REASONS:
        m.online_rollbacks.labels(reason=reason)
    for reason in EXPIRY_REASONS:
        m.feedback_expired.labels(reason=reason)
    for name in algorithms:
        for outcome in OUTCOMES:
            m.tasks.labels(algorithm=name, outcome=outcome)
        for metric in (m.labelled, m.failures):
            metric.labels(algorithm=name)
    return m

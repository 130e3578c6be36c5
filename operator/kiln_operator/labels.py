"""Every label and annotation key Kiln writes or reads, in one place: builders set them, watches select on them,
state machines read them. Children carry their bookkeeping in annotations, so the children are the source of
truth and an operator restarted at any line recomputes the same status."""

from __future__ import annotations

# Kubernetes' recommended labels, on every child.
NAME = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
PART_OF = "app.kubernetes.io/part-of"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "kiln-operator"  # the managed-by value, the field manager and the Events' reporting component
# Server-side filtering of the watches: the operator caches only the Jobs, Deployments and pods it made.
MANAGED_SELECTOR = f"{MANAGED_BY}={OPERATOR}"

# Which custom resource a child belongs to (the value is the owner's name, or its DNS-label form).
TRAININGJOB = "kiln.dev/trainingjob"
MODELCOMPRESSION = "kiln.dev/modelcompression"
MODELDEPLOYMENT = "kiln.dev/modeldeployment"
ATTEMPT = "kiln.dev/attempt"  # a Job's attempt number (TrainingJob, ModelCompression)
SOURCE = "kiln.dev/source"  # a compressor Job's source artifact key
REVISION = "kiln.dev/revision"  # a serving Deployment's revision key
# A cluster-scoped child (which cannot have a namespaced owner reference): its owner's namespace and uid.
OWNER_NAMESPACE = "kiln.dev/owner-namespace"
OWNER_UID = "kiln.dev/owner-uid"

# Set by Kubernetes or Kueue, read by Kiln.
QUEUE = "kueue.x-k8s.io/queue-name"
KUEUE_JOB_UID = "kueue.x-k8s.io/job-uid"  # on a Workload: the uid of the Job it queues
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"  # on a Job's pods: which incarnation of the Job made them
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # on an Indexed Job's pods: the rank

# TrainingJob attempts (annotations on each Job).
LEDGER = "kiln.dev/ledger"  # what all attempts before this one used up (lifecycle.trainingjob.Ledger)
RESUME_FROM = "kiln.dev/resume-from"  # the checkpoint the attempt resumes from

# ModelDeployment revisions (annotations on each Deployment): the rollout state.
REVISION_NUMBER = "kiln.dev/revision-number"
ARTIFACT_URI = "kiln.dev/artifact-uri"
ARTIFACT_DIGEST = "kiln.dev/artifact-digest"
ROLE = "kiln.dev/role"  # stable | candidate
CANARY_STEP = "kiln.dev/canary-step"
STEP_STARTED = "kiln.dev/step-started"  # epoch seconds the step's replicas were all ready
CREATED = "kiln.dev/created"  # epoch seconds (progress deadline)
TEMPLATE_HASH = "kiln.dev/template-hash"  # what the pod template was built from (drift -> apply again)
# On a ModelDeployment: "<candidate shortDigest>/<step>", a person passes a canary step without its pause.
APPROVE = "kiln.dev/approve"

# kopf's own storage on the objects it handles: Kiln's prefix from day one (changing it re-handles everything).
PREFIX = "kiln.dev"
FINALIZER = "kiln.dev/finalizer"


def recommended(name: str, instance: str, component: str) -> dict[str, str]:
    """The app.kubernetes.io labels of a child of ``instance`` (name: the program, component: its role)."""
    return {NAME: name, INSTANCE: instance, COMPONENT: component, PART_OF: "kiln", MANAGED_BY: OPERATOR}

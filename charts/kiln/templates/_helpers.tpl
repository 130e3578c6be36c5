{{/*
Shared pieces of the templates. Each object mirrors its file under manifests/ (named in its template's first line);
tests/unit/test_chart.py renders both and requires the same objects.
*/}}

{{/* An object's name: namePrefix in front, as a kustomize overlay's namePrefix does. Call with (list $ "name"). */}}
{{- define "kiln.name" -}}
{{- $ := index . 0 -}}
{{- printf "%s%s" $.Values.namePrefix (index . 1) | trunc 253 -}}
{{- end -}}

{{/*
Helm's recommended labels, added beside each object's own labels from manifests/ (never to selectors or the pod
template, which must stay what the Service, NetworkPolicy and monitors select). Not app.kubernetes.io/managed-by:
Helm on anything the operator's label selector reads: that label means kiln-operator on the objects it makes.
*/}}
{{- define "kiln.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "kiln.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/*
The operator's rules on what lives in a namespace (manifests/base/clusterrole.yaml, first part, and
components/namespaced/role.yaml): in the ClusterRole with scope cluster, in a Role with scope namespace.
docs/operations.md, "RBAC", gives each rule's reason.
*/}}
{{- define "kiln.namespacedRules" -}}
# kopf watches the three kinds (initial list, then watch) and patches them: finalizer kiln.dev/finalizer and the
# kiln.dev/ progress and last-handled-configuration annotations; delete: runPolicy.ttlSecondsAfterFinished.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs", "modelcompressions", "modeldeployments"]
  verbs: ["list", "watch", "patch", "delete"]
# status.write(): observedGeneration + conditions, merge-patched on the status subresource.
- apiGroups: ["kiln.dev"]
  resources: ["trainingjobs/status", "modelcompressions/status", "modeldeployments/status"]
  verbs: ["patch"]
# TrainingJob controller: one Indexed Job per attempt and one headless Service per TrainingJob; kopf lists + watches
# the Jobs and pods it made (label selector app.kubernetes.io/managed-by=kiln-operator) as its cache.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
# With scheduling.queueName: the Kueue Workload of the attempt's Job, listed by its kueue.x-k8s.io/job-uid label
# and patched spec.active for spec.suspend, since Kueue owns a queued Job's suspend. Unused without Kueue.
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "patch"]
# ModelDeployment controller: a Deployment per revision, its Service, PodDisruptionBudget and HPA (server-side apply).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["create", "patch", "delete"]
# Every ModelDeployment: a NetworkPolicy in front of its serving pods.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
# With spec.service.auth Kubernetes: the servers' ServiceAccount and RoleBinding; bind on that one ClusterRole only.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  verbs: ["bind"]
  resourceNames: ["kiln-server-access-review"]
# With spec.service.gateway: the weighted HTTPRoute (Gateway API).
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# The failing pod's log tail and rank 0's kiln-progress lines. Pods themselves get no API permission at all.
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# An Event on each phase transition (create only; never read or patched).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
The rules on cluster-scoped resources (the end of manifests/base/clusterrole.yaml, and all that
components/namespaced keeps in the ClusterRole): read-only for kopf, plus the servers' TokenReview grant.
*/}}
{{- define "kiln.clusterRules" -}}
# kopf's resource observer: a kiln.dev CRD applied or changed later is picked up.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# kopf's namespace observer, whenever the operator runs with --namespace (globs, namespaces created later).
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
# With spec.service.auth Kubernetes: TokenReview is cluster-scoped, so a ClusterRoleBinding per ModelDeployment,
# listed and deleted by the sweep; bind on kiln-server-tokenreview only.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterrolebindings"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  verbs: ["bind"]
  resourceNames: ["kiln-server-tokenreview"]
{{- end -}}

{{/*
Labels of the monitoring objects: their own (from manifests/), Helm's, then monitoring.labels for a Prometheus that
selects by label; merged, so a user label never duplicates a key, and never replaces one of the chart's.
Call with (list $ (dict ...own labels...)).
*/}}
{{- define "kiln.monitoringLabels" -}}
{{- $ := index . 0 -}}
{{- toYaml (merge (dict) (index . 1) (include "kiln.helmLabels" $ | fromYaml) $.Values.monitoring.labels) -}}
{{- end -}}

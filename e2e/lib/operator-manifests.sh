#!/usr/bin/env bash
# Prints the operator's install manifests as the Helm chart renders them with
#   image=OPERATOR_IMAGE, image.pullPolicy=Never, portalImage=PORTAL_IMAGE,
#   replicas=1 (leader election kept on, as in the chart)
# for clusters without helm (the local node). The RBAC rules are read from
# charts/dbportal/files/*-rules.yaml, the same files the chart includes, so
# the operator runs with exactly the chart's permissions.
#
#   operator-manifests.sh OPERATOR_IMAGE PORTAL_IMAGE [NAMESPACE]
set -euo pipefail

[[ $# -ge 2 ]] || { sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2; }
operator_image=$1
portal_image=$2
ns=${3:-dbportal-system}
files=$(cd "$(dirname "$0")/../../charts/dbportal/files" && pwd -P)
name=dbportal-operator
labels="app.kubernetes.io/name: dbportal
    app.kubernetes.io/instance: dbportal
    app.kubernetes.io/component: operator
    app.kubernetes.io/managed-by: e2e"

cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $ns
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: $name
  namespace: $ns
  labels:
    $labels
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: $name
  labels:
    $labels
rules:
$(cat "$files/clusterrole-rules.yaml")
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: $name
  labels:
    $labels
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: $name
subjects:
  - kind: ServiceAccount
    name: $name
    namespace: $ns
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: $name-leader-election
  namespace: $ns
  labels:
    $labels
rules:
$(cat "$files/leader-election-rules.yaml")
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: $name-leader-election
  namespace: $ns
  labels:
    $labels
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: $name-leader-election
subjects:
  - kind: ServiceAccount
    name: $name
    namespace: $ns
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: $name
  namespace: $ns
  labels:
    $labels
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: dbportal
      app.kubernetes.io/instance: dbportal
      app.kubernetes.io/component: operator
  template:
    metadata:
      labels:
        ${labels//$'\n'    /$'\n'        }
    spec:
      serviceAccountName: $name
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: operator
          image: $operator_image
          imagePullPolicy: Never
          env:
            - name: POD_NAME
              valueFrom: {fieldRef: {fieldPath: metadata.name}}
            - name: POD_NAMESPACE
              valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
            - {name: DBPORTAL_WATCH_NAMESPACE, value: ""}
            - {name: DBPORTAL_PORTAL_IMAGE, value: "$portal_image"}
            - {name: DBPORTAL_METRICS_ADDRESS, value: "0.0.0.0:8080"}
            - {name: DBPORTAL_LEADER_ELECTION, value: "true"}
            - {name: DBPORTAL_CONCURRENCY, value: "16"}
            - {name: RUST_LOG, value: "info"}
          ports:
            - {name: metrics, containerPort: 8080, protocol: TCP}
          readinessProbe:
            httpGet: {path: /readyz, port: metrics}
            periodSeconds: 5
          livenessProbe:
            httpGet: {path: /healthz, port: metrics}
            periodSeconds: 10
          resources:
            requests: {cpu: 50m, memory: 64Mi}
            limits: {memory: 128Mi}
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities: {drop: [ALL]}
EOF

#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: a read-only kubeconfig of one cluster for the others."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: sdn_tunnel_remote_kubeconfig
short_description: Kubeconfig of a ServiceAccount of one cluster, for other clusters' agents
description:
  - Mints a token for I(service_account) with the TokenRequest API of the
    cluster reached through I(kubeconfig)/I(context), and returns a
    kubeconfig with that cluster's server URL and CA and that token.
  - Idempotent - when I(current) (the kubeconfig stored in the consumer
    cluster's Secret) still points at the same server and CA, its token is
    still accepted (TokenReview) as that ServiceAccount, and it stays valid
    for more than I(renew_before_seconds), it is returned unchanged and the
    task reports no change.
  - Works without controller-manager (no token Secrets needed).
options:
  kubeconfig: {type: path, required: true}
  context: {type: str}
  server:
    type: str
    description: Server URL the consumers use; the kubeconfig's when unset.
  namespace: {type: str, required: true}
  service_account: {type: str, required: true}
  current: {type: str, default: ""}
  expiration_seconds: {type: int, default: 31536000}
  renew_before_seconds: {type: int, default: 2592000}
  cluster_name: {type: str, required: true}
"""

RETURN = r"""
kubeconfig: {type: str, description: the kubeconfig (YAML), returned when I(changed) or unchanged}
reason: {type: str, description: why a new token was minted, or why the current one was kept}
expires: {type: int, description: expiry of the token (Unix time)}
"""

import base64
import json
import time

from ansible.module_utils.basic import AnsibleModule

try:
    import yaml
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    HAS_DEPS = True
except ImportError:  # pragma: no cover
    HAS_DEPS = False


def _context_cluster(raw, context):
    ctx_name = context or raw.get("current-context")
    ctx = next((c["context"] for c in raw.get("contexts", []) if c["name"] == ctx_name), None)
    if ctx is None:
        raise ValueError("no context %r in the kubeconfig" % ctx_name)
    cluster = next((c["cluster"] for c in raw.get("clusters", []) if c["name"] == ctx["cluster"]), None)
    if cluster is None:
        raise ValueError("no cluster %r in the kubeconfig" % ctx["cluster"])
    return cluster


def _ca_data(cluster):
    if cluster.get("certificate-authority-data"):
        return cluster["certificate-authority-data"]
    if cluster.get("certificate-authority"):
        with open(cluster["certificate-authority"], "rb") as f:
            return base64.b64encode(f.read()).decode()
    return None


def _jwt_exp(token):
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        return int(json.loads(base64.urlsafe_b64decode(payload)).get("exp", 0))
    except Exception:
        return 0


def build_kubeconfig(name, server, ca, insecure, token):
    cluster = {"server": server}
    if ca:
        cluster["certificate-authority-data"] = ca
    if insecure:
        cluster["insecure-skip-tls-verify"] = True
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": name, "cluster": cluster}],
            "users": [{"name": "remote-reader", "user": {"token": token}}],
            "contexts": [{"name": name, "context": {"cluster": name, "user": "remote-reader"}}],
            "current-context": name,
        },
        default_flow_style=False,
        sort_keys=True,
    )


def keep_current(module, api_client, current, server, ca, username):
    """None when `current` can be kept, else the reason it cannot."""
    p = module.params
    if not current.strip():
        return "no kubeconfig stored yet"
    try:
        doc = yaml.safe_load(current)
        cluster = doc["clusters"][0]["cluster"]
        token = doc["users"][0]["user"]["token"]
    except Exception:
        return "the stored kubeconfig is not one of ours"
    if cluster.get("server") != server or cluster.get("certificate-authority-data") != ca:
        return "the cluster's server URL or CA changed"
    left = _jwt_exp(token) - int(time.time())
    if left < p["renew_before_seconds"]:
        return "the stored token expires in %d s" % left
    review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
    result = client.AuthenticationV1Api(api_client).create_token_review(review)
    st = result.status
    if not st.authenticated or st.user is None or st.user.username != username:
        return "the stored token is no longer accepted (%s)" % (st.error or "not authenticated")
    return None


def main():
    module = AnsibleModule(
        argument_spec=dict(
            kubeconfig=dict(type="path", required=True),
            context=dict(type="str"),
            server=dict(type="str"),
            namespace=dict(type="str", required=True),
            service_account=dict(type="str", required=True),
            current=dict(type="str", default=""),  # the task sets no_log
            expiration_seconds=dict(type="int", default=31536000),
            renew_before_seconds=dict(type="int", default=2592000),
            cluster_name=dict(type="str", required=True),
        ),
        supports_check_mode=True,
    )
    if not HAS_DEPS:
        module.fail_json(msg="the kubernetes and PyYAML Python packages are required (Debian: python3-kubernetes)")
    p = module.params
    try:
        with open(p["kubeconfig"]) as f:
            raw = yaml.safe_load(f)
        cluster = _context_cluster(raw, p["context"])
        server = p["server"] or cluster["server"]
        ca = _ca_data(cluster)
        insecure = bool(cluster.get("insecure-skip-tls-verify"))
        api_client = config.new_client_from_config(config_file=p["kubeconfig"], context=p["context"])
        username = "system:serviceaccount:%s:%s" % (p["namespace"], p["service_account"])
        why = keep_current(module, api_client, p["current"], server, ca, username)
        if why is None:
            module.exit_json(
                changed=False,
                kubeconfig=p["current"],
                reason="the stored token is valid",
                expires=_jwt_exp(yaml.safe_load(p["current"])["users"][0]["user"]["token"]),
            )
        if module.check_mode:
            module.exit_json(changed=True, kubeconfig=p["current"], reason=why, expires=0)
        req = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=p["expiration_seconds"])
        )
        resp = client.CoreV1Api(api_client).create_namespaced_service_account_token(
            p["service_account"], p["namespace"], req
        )
        token = resp.status.token
        module.exit_json(
            changed=True,
            kubeconfig=build_kubeconfig(p["cluster_name"], server, ca, insecure, token),
            reason=why,
            expires=_jwt_exp(token),
        )
    except ApiException as e:
        module.fail_json(msg="cluster %s: %s %s: %s" % (p["cluster_name"], e.status, e.reason, e.body))
    except Exception as e:
        module.fail_json(msg="cluster %s: %s" % (p["cluster_name"], e))


if __name__ == "__main__":
    main()

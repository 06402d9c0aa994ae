#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module: finish deleting a namespace on an API server that has no
namespace controller (sdn-tunnel's lab runs kube-apiserver without
kube-controller-manager). Real clusters never need it."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
module: sdn_tunnel_finalize_namespace
short_description: Finalize a Terminating namespace whose content was deleted
description:
  - Only for API servers without kube-controller-manager (the sdn-tunnel
    lab), where a deleted namespace stays Terminating forever. The playbook
    calls it after deleting every object it created in the namespace; it
    refuses when the namespace still holds any listed object kind.
options:
  kubeconfig: {type: path, required: true}
  context: {type: str}
  name: {type: str, required: true}
"""

from ansible.module_utils.basic import AnsibleModule

try:
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    HAS_DEPS = True
except ImportError:  # pragma: no cover
    HAS_DEPS = False


def main():
    module = AnsibleModule(
        argument_spec=dict(
            kubeconfig=dict(type="path", required=True),
            context=dict(type="str"),
            name=dict(type="str", required=True),
        ),
        supports_check_mode=True,
    )
    if not HAS_DEPS:
        module.fail_json(msg="the kubernetes Python package is required (Debian: python3-kubernetes)")
    p = module.params
    api_client = config.new_client_from_config(config_file=p["kubeconfig"], context=p["context"])
    core = client.CoreV1Api(api_client)
    try:
        ns = core.read_namespace(p["name"])
    except ApiException as e:
        if e.status == 404:
            module.exit_json(changed=False, msg="namespace %s is gone" % p["name"])
        module.fail_json(msg="read namespace %s: %s %s" % (p["name"], e.status, e.reason))
    if ns.metadata.deletion_timestamp is None:
        module.fail_json(msg="namespace %s is not being deleted" % p["name"])
    left = []
    for what, lister in (
        ("secrets", core.list_namespaced_secret),
        ("serviceaccounts", core.list_namespaced_service_account),
        ("services", core.list_namespaced_service),
        ("configmaps", core.list_namespaced_config_map),
        ("pods", core.list_namespaced_pod),
    ):
        items = lister(p["name"]).items
        # kube-root-ca.crt is published by controller-manager, absent here
        left += ["%s/%s" % (what, i.metadata.name) for i in items]
    apps = client.AppsV1Api(api_client)
    left += ["daemonsets/%s" % i.metadata.name for i in apps.list_namespaced_daemon_set(p["name"]).items]
    left += ["deployments/%s" % i.metadata.name for i in apps.list_namespaced_deployment(p["name"]).items]
    if left:
        module.fail_json(msg="namespace %s still holds %s: not finalizing" % (p["name"], ", ".join(left)))
    if not module.check_mode:
        ns.spec.finalizers = []
        core.replace_namespace_finalize(p["name"], ns)
    module.exit_json(changed=True, msg="namespace %s finalized" % p["name"])


if __name__ == "__main__":
    main()

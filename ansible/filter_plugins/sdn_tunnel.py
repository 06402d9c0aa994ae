# Filters of the sdn-tunnel playbooks (plain Python, standard library only).
"""sdn-tunnel filters: CIDR preflight, image override, CoreDNS stub block."""

import ipaddress
import os
import re

import yaml

COREDNS_BEGIN = "# BEGIN sdn-tunnel (managed by the sdn-tunnel playbook; do not edit)"
COREDNS_END = "# END sdn-tunnel"


def _nets(cluster, key, problems):
    out = []
    values = cluster.get(key)
    if not isinstance(values, (list, tuple)) or not values:
        problems.append("cluster %s: %s must be a non-empty list of CIDRs" % (cluster["name"], key))
        return out
    for v in values:
        try:
            net = ipaddress.ip_network(str(v), strict=True)
        except ValueError as e:
            problems.append("cluster %s: %s entry %r is not a CIDR (%s)" % (cluster["name"], key, v, e))
            continue
        if net.prefixlen == 0:
            problems.append("cluster %s: %s entry %s is a default route" % (cluster["name"], key, net))
            continue
        if net.is_loopback or net.is_link_local or net.is_multicast:
            problems.append("cluster %s: %s entry %s is loopback, link-local or multicast" % (cluster["name"], key, net))
            continue
        out.append(net)
    return out


def cidr_problems(names, hostvars):
    """Every reason the clusters' pod and service CIDRs cannot form a mesh:
    malformed CIDRs, default routes, and any overlap between two ranges
    (of two clusters, or pod vs service of one cluster). Empty when fine."""
    problems = []
    ranges = []  # (cluster, kind, net)
    for name in names:
        hv = hostvars[name]
        cluster = {
            "name": hv.get("cluster_name", name),
            "pod_cidrs": hv.get("pod_cidrs"),
            "service_cidrs": hv.get("service_cidrs"),
        }
        for key, kind in (("pod_cidrs", "pod"), ("service_cidrs", "service")):
            for net in _nets(cluster, key, problems):
                ranges.append((cluster["name"], kind, net))
    for i, (ca, ka, na) in enumerate(ranges):
        for cb, kb, nb in ranges[i + 1:]:
            if na.version == nb.version and na.overlaps(nb):
                problems.append(
                    "%s CIDR %s of cluster %s overlaps %s CIDR %s of cluster %s" % (ka, na, ca, kb, nb, cb)
                )
    return problems


MANAGED_LABELS = {
    "app.kubernetes.io/part-of": "sdn-tunnel",
    "app.kubernetes.io/managed-by": "sdn-tunnel-ansible",
}


def manifests(deploy_dir, image=None):
    """Every document of the files `deploy/kustomization.yaml` lists, in its
    order (so `kubectl apply -k deploy/` and the playbook apply the same
    thing), with the image override applied."""
    with open(os.path.join(deploy_dir, "kustomization.yaml")) as f:
        kustomization = yaml.safe_load(f)
    docs = []
    for resource in kustomization["resources"]:
        with open(os.path.join(deploy_dir, resource)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return set_image(docs, image)


def tunnel_cluster(hv, name, here, namespace):
    """The TunnelCluster that cluster `here` holds for cluster `name` (whose
    inventory variables are `hv`)."""
    local = name == here
    cluster_name = hv.get("cluster_name", name)
    spec = {
        "clusterName": cluster_name,
        "podCIDRs": list(hv["pod_cidrs"]),
        "serviceCIDRs": list(hv["service_cidrs"]),
        "local": local,
    }
    if hv.get("dns_zone"):
        spec["dnsZone"] = hv["dns_zone"]
    if not local:
        spec["kubeconfigSecretRef"] = {"name": "%s-kubeconfig" % cluster_name, "namespace": namespace}
        overrides = hv.get("endpoint_overrides") or []
        if overrides:
            spec["endpointOverrides"] = [{"node": o["node"], "endpoint": o["endpoint"]} for o in overrides]
    return {
        "apiVersion": "sdntunnel.io/v1alpha1",
        "kind": "TunnelCluster",
        "metadata": {"name": cluster_name, "labels": dict(MANAGED_LABELS)},
        "spec": spec,
    }


def kubeconfig_secret(kubeconfig, cluster_name, namespace):
    """The Secret holding a remote cluster's read-only kubeconfig."""
    import base64

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": "%s-kubeconfig" % cluster_name,
            "namespace": namespace,
            "labels": dict(MANAGED_LABELS, **{"sdntunnel.io/cluster": cluster_name}),
        },
        "data": {"kubeconfig": base64.b64encode(kubeconfig.encode()).decode()},
    }


def set_image(docs, image):
    """The manifests with every container image of our Deployments and
    DaemonSets replaced by `image` (when it is set)."""
    if not image:
        return docs
    out = []
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") in ("DaemonSet", "Deployment"):
            spec = doc["spec"]["template"]["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                c["image"] = image
        out.append(doc)
    return out


def strip_coredns_block(corefile):
    """The Corefile without our block (and without the blank line we add)."""
    pattern = re.compile(r"\n?" + re.escape(COREDNS_BEGIN) + r".*?" + re.escape(COREDNS_END) + r"\n?", re.S)
    return pattern.sub("\n", corefile or "").rstrip("\n") + "\n"


def coredns_corefile(corefile, zones, server, cache_seconds=5):
    """The Corefile with one server block forwarding `zones` to our DNS
    Service at `server` (replacing the block an earlier run added)."""
    base = strip_coredns_block(corefile)
    zones = sorted(set(z.rstrip(".") for z in zones))
    block = "\n".join(
        [
            COREDNS_BEGIN,
            " ".join("%s:53" % z for z in zones) + " {",
            "    errors",
            "    cache %d" % int(cache_seconds),
            "    forward . %s" % server,
            "}",
            COREDNS_END,
        ]
    )
    return base + "\n" + block + "\n"


def name_of(host, hostvars):
    """The mesh name of inventory host `host`."""
    return hostvars[host].get("cluster_name", host)


def zone_of(host, hostvars):
    """The DNS zone of inventory host `host`."""
    return hostvars[host].get("dns_zone") or "cluster.%s" % name_of(host, hostvars)


class FilterModule(object):
    def filters(self):
        return {
            "sdn_tunnel_cidr_problems": cidr_problems,
            "sdn_tunnel_set_image": set_image,
            "sdn_tunnel_manifests": manifests,
            "sdn_tunnel_name_of": name_of,
            "sdn_tunnel_zone_of": zone_of,
            "sdn_tunnel_tunnel_cluster": tunnel_cluster,
            "sdn_tunnel_kubeconfig_secret": kubeconfig_secret,
            "sdn_tunnel_corefile": coredns_corefile,
            "sdn_tunnel_strip_corefile": strip_coredns_block,
        }

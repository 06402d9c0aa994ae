//! The kubelet lab's EndpointSlice feed: every `v1` Endpoints object (what
//! kube-controller-manager's endpoints controller writes from the pods'
//! readiness) mirrored into the `discovery.k8s.io/v1` stand-in CRD
//! ([`crate::controlplane::ENDPOINTSLICE_V1_SHIM_CRD`]).
//!
//! Why: the 1.20 controller-manager writes EndpointSlices only as
//! `v1beta1`, which the lab's apiserver does not serve (its `v1` is the
//! shim), while sdn-tunnel reads `v1`. So the lab turns kcm's
//! endpointslice controllers off and runs this instead, one process per
//! cluster (`lab mirror-endpointslices`). One slice per Endpoints subset,
//! named `<endpoints>-mirror-<i>`, labelled like the real controller's
//! (`kubernetes.io/service-name`), ready from `addresses`, not ready from
//! `notReadyAddresses`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

/// `endpointslice.kubernetes.io/managed-by` of the mirrored slices.
pub const MANAGED_BY: &str = "endpointslice-mirror.sdn-tunnel-lab";
const FIELD_MANAGER: &str = "sdn-tunnel-lab-mirror";
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_LABEL: &str = "endpointslice.kubernetes.io/managed-by";

/// The slices one Endpoints object maps to (pure).
pub fn slices_for(ep: &Endpoints) -> Vec<EndpointSlice> {
    let name = ep.name_any();
    let ns = ep.namespace().unwrap_or_else(|| "default".into());
    let endpoint = |a: &EndpointAddress, ready: bool| Endpoint {
        addresses: vec![a.ip.clone()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(false),
        }),
        hostname: a.hostname.clone(),
        node_name: a.node_name.clone(),
        target_ref: a.target_ref.clone(),
        ..Default::default()
    };
    ep.subsets
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, s)| EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-mirror-{i}")),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([
                    (SERVICE_LABEL.to_string(), name.clone()),
                    (MANAGED_LABEL.to_string(), MANAGED_BY.to_string()),
                ])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: s
                .addresses
                .iter()
                .flatten()
                .map(|a| endpoint(a, true))
                .chain(
                    s.not_ready_addresses
                        .iter()
                        .flatten()
                        .map(|a| endpoint(a, false)),
                )
                .collect(),
            ports: Some(
                s.ports
                    .iter()
                    .flatten()
                    .map(|p| EndpointPort {
                        name: p.name.clone(),
                        port: Some(p.port),
                        protocol: p.protocol.clone(),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
            ),
        })
        .collect()
}

/// Makes the mirrored slices of `(namespace, name)` equal to `want`.
async fn sync(client: &Client, ns: &str, name: &str, want: Vec<EndpointSlice>) -> Result<()> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let keep: BTreeSet<String> = want.iter().map(|s| s.name_any()).collect();
    for s in &want {
        api.patch(&s.name_any(), &pp, &Patch::Apply(s)).await?;
    }
    let lp = ListParams::default().labels(&format!(
        "{MANAGED_LABEL}={MANAGED_BY},{SERVICE_LABEL}={name}"
    ));
    for old in api.list(&lp).await? {
        if !keep.contains(&old.name_any()) {
            delete(&api, &old.name_any()).await?;
        }
    }
    Ok(())
}

async fn delete(api: &Api<EndpointSlice>, name: &str) -> Result<()> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Removes mirrored slices whose Endpoints object is not in `live`.
async fn remove_orphans(client: &Client, live: &BTreeSet<(String, String)>) -> Result<()> {
    let all: Api<EndpointSlice> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("{MANAGED_LABEL}={MANAGED_BY}"));
    for s in all.list(&lp).await? {
        let ns = s.namespace().unwrap_or_default();
        let svc = s.labels().get(SERVICE_LABEL).cloned().unwrap_or_default();
        if !live.contains(&(ns.clone(), svc)) {
            delete(&Api::namespaced(client.clone(), &ns), &s.name_any()).await?;
        }
    }
    Ok(())
}

/// Mirrors until the process is stopped. A failed write is logged and the
/// watch restarted (which resyncs everything).
pub async fn run(client: Client) -> Result<()> {
    let endpoints: Api<Endpoints> = Api::all(client.clone());
    loop {
        let mut stream = watcher(endpoints.clone(), watcher::Config::default()).boxed();
        let mut seen = BTreeSet::new();
        while let Some(ev) = stream.next().await {
            let r = match ev {
                Ok(watcher::Event::Init) => {
                    seen.clear();
                    Ok(())
                }
                Ok(watcher::Event::InitApply(ep)) | Ok(watcher::Event::Apply(ep)) => {
                    let (ns, name) = (ep.namespace().unwrap_or_default(), ep.name_any());
                    seen.insert((ns.clone(), name.clone()));
                    sync(&client, &ns, &name, slices_for(&ep)).await
                }
                Ok(watcher::Event::InitDone) => remove_orphans(&client, &seen).await,
                Ok(watcher::Event::Delete(ep)) => {
                    let (ns, name) = (ep.namespace().unwrap_or_default(), ep.name_any());
                    seen.remove(&(ns.clone(), name.clone()));
                    sync(&client, &ns, &name, Vec::new()).await
                }
                Err(e) => Err(e.into()),
            };
            if let Err(e) = r {
                tracing::warn!("endpointslice mirror: {e:#}; restarting the watch");
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_become_slices_with_readiness() {
        let ep: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "subsets": [{
                "addresses": [{"ip": "10.1.1.10", "nodeName": "east-node-1"}],
                "notReadyAddresses": [{"ip": "10.1.2.10", "nodeName": "east-node-2"}],
                "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}]
            }]
        }))
        .unwrap();
        let s = slices_for(&ep);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name_any(), "web-mirror-0");
        assert_eq!(s[0].labels()[SERVICE_LABEL], "web");
        let ready: Vec<_> = s[0]
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addresses[0].as_str(),
                    e.conditions.as_ref().unwrap().ready,
                )
            })
            .collect();
        assert_eq!(
            ready,
            [("10.1.1.10", Some(true)), ("10.1.2.10", Some(false))]
        );
        assert_eq!(s[0].ports.as_ref().unwrap()[0].port, Some(8080));
        let empty: Endpoints =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        assert!(slices_for(&empty).is_empty());
    }
}

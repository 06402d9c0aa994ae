//! From [`DnsRecords`] (decided in `sdn-tunnel-core`) to hickory zones: one
//! authoritative in-memory zone per `cluster.<name>` and one for the merged
//! zone, the forwarder for everything else, all behind a [`DnsHandler`]
//! whose catalog is swapped whole on every change.

use std::sync::Arc;

use arc_swap::ArcSwap;

use hickory_server::net::runtime::Time;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneHandler, ZoneType};
use sdn_tunnel_core::dns::{DnsRecords, RecordData};
use thiserror::Error;
use tracing::trace;

#[derive(Debug, Error)]
pub enum ZoneError {
    #[error("{name:?} is not a DNS name: {why}")]
    BadName { name: String, why: String },
    #[error("zone {zone}: cannot add {name}: {why}")]
    Insert {
        zone: String,
        name: String,
        why: String,
    },
}

fn name(s: &str) -> Result<Name, ZoneError> {
    let mut n = Name::from_ascii(s).map_err(|e| ZoneError::BadName {
        name: s.to_string(),
        why: e.to_string(),
    })?;
    n.set_fqdn(true);
    Ok(n)
}

/// One in-memory zone with its SOA (the negative-answer TTL is `ttl` too).
fn zone_handler(
    zone: &str,
    records: &sdn_tunnel_core::dns::Zone,
    ttl: u32,
    serial: u32,
) -> Result<InMemoryZoneHandler, ZoneError> {
    let origin = name(zone)?;
    let mut handler =
        InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let insert_err = |n: &str, why: &str| ZoneError::Insert {
        zone: zone.to_string(),
        name: n.to_string(),
        why: why.to_string(),
    };
    let soa = SOA::new(
        name(&format!("ns.{zone}"))?,
        name(&format!("hostmaster.{zone}"))?,
        serial,
        60,
        10,
        600,
        ttl,
    );
    if !handler.upsert_mut(Record::from_rdata(origin, ttl, RData::SOA(soa)), serial) {
        return Err(insert_err(zone, "SOA refused"));
    }
    for (owner, data) in &records.records {
        let owner_name = name(owner)?;
        for d in data {
            let rdata = match d {
                RecordData::Addr(std::net::IpAddr::V4(ip)) => RData::A(A(*ip)),
                RecordData::Addr(std::net::IpAddr::V6(ip)) => RData::AAAA(AAAA(*ip)),
                RecordData::Srv { port, target } => {
                    RData::SRV(SRV::new(0, 10, *port, name(target)?))
                }
            };
            if !handler.upsert_mut(Record::from_rdata(owner_name.clone(), ttl, rdata), serial) {
                return Err(insert_err(owner, "record refused"));
            }
        }
    }
    Ok(handler)
}

/// A catalog serving `records` with `ttl`, and forwarding every other name
/// to `forwarder` (REFUSED without one). A zone that cannot be built is left
/// out (and returned with the reason); the others are served.
pub fn build_catalog(
    records: &DnsRecords,
    ttl: u32,
    serial: u32,
    forwarder: Option<Arc<dyn ZoneHandler>>,
) -> (Catalog, Vec<ZoneError>) {
    let mut catalog = Catalog::new();
    let mut errors = Vec::new();
    if let Some(f) = forwarder {
        catalog.upsert(LowerName::from(Name::root()), vec![f]);
    }
    for (zone, zrecords) in &records.zones {
        let built = zone_handler(zone, zrecords, ttl, serial)
            .and_then(|h| Ok((LowerName::from(name(zone)?), h)));
        match built {
            Ok((origin, handler)) => catalog.upsert(origin, vec![Arc::new(handler)]),
            Err(e) => errors.push(e),
        }
    }
    (catalog, errors)
}

/// The request handler given to the hickory server: answers from the
/// current catalog, which [`DnsHandler::replace`] swaps atomically (a query
/// in flight finishes on the catalog it started with).
#[derive(Clone)]
pub struct DnsHandler {
    current: Arc<ArcSwap<Catalog>>,
}

impl DnsHandler {
    pub fn new(catalog: Catalog) -> Self {
        DnsHandler {
            current: Arc::new(ArcSwap::from_pointee(catalog)),
        }
    }

    pub fn replace(&self, catalog: Catalog) {
        self.current.store(Arc::new(catalog));
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.current.load_full()
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let catalog = self.catalog();
        let info = catalog
            .handle_request::<R, T>(request, response_handle)
            .await;
        if tracing::enabled!(tracing::Level::TRACE) {
            let query = request
                .request_info()
                .map(|i| format!("{} {}", i.query.name(), i.query.query_type()))
                .unwrap_or_else(|_| "(no single query)".into());
            trace!(src = %request.src(), %query, rcode = ?info.response_code, answers = info.counts().answers, "query");
        }
        info
    }
}

//! Hand-written schema fragments for fields whose OpenAPI validation the
//! derive cannot express (a `format` or `pattern` on the *items* of a list).
//!
//! Only keywords that a Kubernetes 1.20 apiserver understands are used here:
//! `format: cidr` (validated by the apiserver with Go's `net.ParseCIDR`),
//! `pattern` (RE2), `minItems`/`maxItems`, `minimum`/`maximum`. No CEL
//! (`x-kubernetes-validations`), which 1.20 refuses.

use schemars::{json_schema, Schema, SchemaGenerator};

/// Base64 of a 32-byte X25519 public key: 43 significant characters, the last
/// of which can only carry 4 bits, then one `=` of padding.
pub const PUBLIC_KEY_PATTERN: &str = "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw480]=$";

/// `host:port`, where host is a DNS name, an IPv4 address or a bracketed IPv6
/// address. The port range is checked by [`crate::validate::Endpoint::parse`];
/// the pattern only rejects what is obviously not an endpoint.
pub const ENDPOINT_PATTERN: &str =
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$";

/// DNS-1123 label, as Kubernetes requires for names; cluster names end up in
/// DNS zones (`cluster.<name>`), so they must be one.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A non-empty list of CIDRs.
pub fn cidr_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "items": { "type": "string", "format": "cidr" }
    })
}

/// A non-empty list of `host:port` endpoints.
pub fn endpoint_list(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "items": { "type": "string", "pattern": ENDPOINT_PATTERN }
    })
}

/// One `host:port` endpoint.
pub fn endpoint(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": ENDPOINT_PATTERN })
}

/// A WireGuard public key in base64.
pub fn public_key(_: &mut SchemaGenerator) -> Schema {
    json_schema!({ "type": "string", "pattern": PUBLIC_KEY_PATTERN })
}

/// A cluster or node name used as a DNS label.
pub fn dns_label(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": 63,
        "pattern": DNS_LABEL_PATTERN
    })
}

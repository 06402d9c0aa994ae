//! The sdn-tunnel lab: several Kubernetes clusters on one machine, each with a
//! real etcd and kube-apiserver, nodes and pods in network namespaces.

pub mod config;
pub mod pki;
pub mod sys;

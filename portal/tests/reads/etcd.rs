//! etcd: to come.

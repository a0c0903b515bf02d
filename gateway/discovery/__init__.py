"""Membership sources: each pushes full snapshots of the replicas it knows to a sink.

See base.py for the snapshot contract the pool relies on.
"""

from gateway.discovery.base import (
    DiscoveredReplica,
    Discovery,
    DiscoveryErrors,
    MembershipSink,
)
from gateway.discovery.dns import DnsDiscovery
from gateway.discovery.kube_auth import (
    KubeConfigError,
    KubeCredentials,
    in_cluster_credentials,
    kubeconfig_credentials,
)
from gateway.discovery.kubernetes import KubernetesDiscovery
from gateway.discovery.static import FileWatch, StaticDiscovery, read_url_file, replicas_from_urls

__all__ = [
    "DiscoveredReplica",
    "Discovery",
    "DiscoveryErrors",
    "DnsDiscovery",
    "FileWatch",
    "KubeConfigError",
    "KubeCredentials",
    "KubernetesDiscovery",
    "MembershipSink",
    "StaticDiscovery",
    "in_cluster_credentials",
    "kubeconfig_credentials",
    "read_url_file",
    "replicas_from_urls",
]

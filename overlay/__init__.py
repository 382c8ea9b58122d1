"""overlay: a flannel-compatible VXLAN container overlay.

The daemon (`overlayd`) leases a subnet for its host from etcd and converges the kernel to the
desired VXLAN state computed from every lease; `overlayctl` is the operator's CLI and the lab.
"""

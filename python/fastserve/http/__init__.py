"""The HTTP face of fastserve: the Open Inference Protocol (KServe V2) REST API."""

"""Results as DICOM objects a PACS files under the source study (:mod:`.objects`), and their
delivery to a PACS by C-STORE (:mod:`.send`).

This package sits below :mod:`recnec_cli.orchestration`: it builds, writes and sends; the scan
decides when.
"""

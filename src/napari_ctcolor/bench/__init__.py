"""Same-run measurements: ``ctcolor bench`` (`runs`: speed, memory and accuracy sections, each against its peers on
the same machine in the same run, with the registration peers of `napari_ctcolor.peers`). The CLI calls the bench;
the bench never imports the CLI (it times ``ctcolor`` as a subprocess)."""

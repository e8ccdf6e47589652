"""The worker's view through the controller: VNC and sound of a VM, reached with a handle only.

* :mod:`~vmcloud.console.vnc`: ``/console/{handle}`` (and the operator's ``/console/vm/{vmid}``,
  where the controller logs in to the VM itself with the operator's view-only password), a
  WebSocket relayed to the VM's VNC server, for noVNC;
* :mod:`~vmcloud.console.audio`: ``/audio/{handle}`` (WebSocket: Opus packets, or PCM) and
  ``/audio/{handle}.ogg`` (live Ogg/Opus over HTTP), one capture per handle fanned out;
* :mod:`~vmcloud.console.screen`: ``/console/vm/{vmid}/screen.png``, a still of a VM's screen for
  the operator's monitor (one short RFB conversation of the controller's own, scaled, PNG);
* :mod:`~vmcloud.console.rfb` and :mod:`~vmcloud.console.ogg`: the sans-IO parts (the view-only
  RFB filter, the controller's own RFB login to a VM and the operator's security-None opening, the
  Ogg page reader);
* :mod:`~vmcloud.console.targets`, :mod:`~vmcloud.console.gate`, :mod:`~vmcloud.console.registry`:
  where a handle leads, who may open a socket, and closing every socket when access ends.

No VM needs a public or floating IP: only the controller dials VMs.
"""

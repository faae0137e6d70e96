"""Apply: render the whole Ray Serve config (`serve_config`, pure), send it (`serve_client`, `applier`) through the one
dashboard client (`dashboard`: token, timeouts, errors), heal drift from it (`drift`), and manage a Ray head of our own
(`ray_cluster`). After `controller.rollout`."""

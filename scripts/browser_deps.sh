#!/usr/bin/env bash
# Best effort: Debian's Chromium for the JupyterLab browser test. Without it that one test
# is skipped with a printed reason; nothing else depends on it.
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian chromium for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed: the browser test will be skipped"
else
  echo "chromium not found and not root: the browser test will be skipped"
fi
exit 0

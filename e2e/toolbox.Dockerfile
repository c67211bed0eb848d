# The suite's client and database pods on clusters that can pull (kind):
# busybox (sh, wget, timeout, usleep), redis-cli with TLS, redis-server, curl.
# The local node builds an equivalent dbportal/toolbox:dev FROM scratch
# (build-images.sh), without redis-server: its databases run on the host.
FROM alpine:3.20
RUN apk add --no-cache redis curl

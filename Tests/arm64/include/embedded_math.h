/* The libm functions FlashAttentionCore and the backward call on scalars (Glibc's overlay provides them in a
 * normal build). The aarch64 test binary links glibc's libm statically. */
float expf(float);
float logf(float);
float log1pf(float);

// kvcoord copy kernel: one CTA per segment, 16-byte vector accesses.
//
// A segment is one contiguous run of bytes (one K or V block of one layer):
// `src` and `dst` are device-visible addresses (device memory opened by CUDA
// IPC, or pinned host memory mapped into the device's address space), `len`
// is its length. Gather reads paged device blocks and writes pinned host
// memory; scatter is the reverse; both use this one kernel.
//
// Regenerate the committed PTX beside this file (any CUDA >= 12 toolkit):
//   nvcc -ptx -arch=compute_80 -O3 -o gpu/kernels/copy_segments.ptx gpu/kernels/copy_segments.cu
// compute_80 PTX is JIT-compiled by the driver for Ampere, Hopper and newer.

struct Segment {
    unsigned long long src;
    unsigned long long dst;
    unsigned long long len;
};

#define UNROLL 4

extern "C" __global__ void kvc_copy_segments(const Segment* __restrict__ segs, unsigned int count) {
    for (unsigned int s = blockIdx.x; s < count; s += gridDim.x) {
        const Segment seg = segs[s];
        const bool aligned = ((seg.src | seg.dst | seg.len) & 15ULL) == 0;
        if (aligned) {
            const uint4* __restrict__ src = reinterpret_cast<const uint4*>(seg.src);
            uint4* __restrict__ dst = reinterpret_cast<uint4*>(seg.dst);
            const unsigned long long n = seg.len >> 4;
            const unsigned long long step = (unsigned long long)blockDim.x * UNROLL;
            unsigned long long i = threadIdx.x;
            // Issue UNROLL independent loads before the stores so that several
            // PCIe reads are in flight per thread.
            for (; i + (UNROLL - 1) * blockDim.x < n; i += step) {
                uint4 v[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) v[u] = src[i + u * blockDim.x];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) dst[i + u * blockDim.x] = v[u];
            }
            for (; i < n; i += blockDim.x) dst[i] = src[i];
        } else {
            const unsigned char* src = reinterpret_cast<const unsigned char*>(seg.src);
            unsigned char* dst = reinterpret_cast<unsigned char*>(seg.dst);
            for (unsigned long long i = threadIdx.x; i < seg.len; i += blockDim.x) dst[i] = src[i];
        }
    }
}

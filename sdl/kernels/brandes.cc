// Shortest-path kernels for betweenness ranking: Brandes' dependency accumulation from
// sampled sources, and the test for nodes that no shortest path passes through.
//
// Brandes' dependency accumulation from a set of source nodes: for each source s, a
// breadth-first search counts the shortest paths sigma_s(v) to every node, and a pass in
// reverse BFS order accumulates delta_s(v) = sum over successors w of
// sigma_s(v) / sigma_s(w) * (1 + delta_s(w)), the share of the shortest paths from s that
// pass through v. Summed over all sources this is exact betweenness (each unordered pair
// twice on an undirected graph); over a sample it is an unbiased estimate after scaling
// by n / k, the pivot estimator of Brandes & Pich (2007).
//
// The graph is CSR: the arcs leaving v are indices[indptr[v] .. indptr[v + 1]). The
// reverse pass pulls from successors along the same out-arcs, so no reverse CSR is
// needed. Sources are split across threads statically (thread t takes sources t, t + T,
// ...) and the per-thread sums are added in thread order, so a result never depends on
// scheduling. Each search resets only the nodes it reached.
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

void accumulate(int64_t n, const int64_t* indptr, const int32_t* indices,
                const int32_t* sources, int64_t k, int64_t first, int64_t stride,
                double* out) {
  std::vector<int32_t> dist(n, -1), order(n);
  std::vector<double> sigma(n, 0.0), delta(n, 0.0);
  for (int64_t i = first; i < k; i += stride) {
    const int32_t s = sources[i];
    dist[s] = 0;
    sigma[s] = 1.0;
    order[0] = s;
    int64_t head = 0, tail = 1;
    while (head < tail) {
      const int32_t v = order[head++];
      const int32_t next = dist[v] + 1;
      const double paths = sigma[v];
      for (int64_t e = indptr[v]; e < indptr[v + 1]; ++e) {
        const int32_t w = indices[e];
        if (dist[w] < 0) {
          dist[w] = next;
          order[tail++] = w;
        }
        if (dist[w] == next) sigma[w] += paths;
      }
    }
    for (int64_t j = tail - 1; j >= 0; --j) {
      const int32_t v = order[j];
      const int32_t next = dist[v] + 1;
      double share = 0.0;
      for (int64_t e = indptr[v]; e < indptr[v + 1]; ++e) {
        const int32_t w = indices[e];
        if (dist[w] == next) share += (1.0 + delta[w]) / sigma[w];
      }
      delta[v] = sigma[v] * share;
      if (v != s) out[v] += delta[v];
    }
    for (int64_t j = 0; j < tail; ++j) {
      const int32_t v = order[j];
      dist[v] = -1;
      sigma[v] = 0.0;
      delta[v] = 0.0;
    }
  }
}

}  // namespace

extern "C" {

// out[v] (zeroed by the caller) += sum over sources[0 .. k) of delta_s(v).
void sdl_source_dependencies(int64_t n, const int64_t* indptr, const int32_t* indices,
                             const int32_t* sources, int64_t k, int32_t threads,
                             double* out) {
  if (threads <= 1 || k <= 1) {
    accumulate(n, indptr, indices, sources, k, 0, 1, out);
    return;
  }
  if (threads > k) threads = static_cast<int32_t>(k);
  std::vector<std::vector<double>> partial(threads - 1, std::vector<double>(n, 0.0));
  std::vector<std::thread> pool;
  for (int32_t t = 1; t < threads; ++t)
    pool.emplace_back(accumulate, n, indptr, indices, sources, k, t, threads,
                      partial[t - 1].data());
  accumulate(n, indptr, indices, sources, k, 0, threads, out);
  for (auto& thread : pool) thread.join();
  for (const auto& p : partial)
    for (int64_t v = 0; v < n; ++v) out[v] += p[v];
}

// never[v] = 1 where v lies inside no shortest path: v has no in-arc or no out-arc, or
// (for at most max_degree in- and out-neighbours) every in-neighbour u has an arc to
// every out-neighbour w != u. Out-lists must be sorted (binary search); most nodes fail
// at their first missing arc, so the work is far below the d_in * d_out worst case.
void sdl_never_between(int64_t n, const int64_t* out_ptr, const int32_t* out_idx,
                       const int64_t* in_ptr, const int32_t* in_idx, int64_t max_degree,
                       uint8_t* never) {
  for (int64_t v = 0; v < n; ++v) {
    const int64_t ins = in_ptr[v + 1] - in_ptr[v], outs = out_ptr[v + 1] - out_ptr[v];
    if (ins == 0 || outs == 0) {
      never[v] = 1;
      continue;
    }
    bool closed = ins <= max_degree && outs <= max_degree;
    for (int64_t a = in_ptr[v]; closed && a < in_ptr[v + 1]; ++a) {
      const int32_t u = in_idx[a];
      const int32_t* first = out_idx + out_ptr[u];
      const int32_t* last = out_idx + out_ptr[u + 1];
      for (int64_t b = out_ptr[v]; b < out_ptr[v + 1]; ++b) {
        const int32_t w = out_idx[b];
        if (w != u && !std::binary_search(first, last, w)) {
          closed = false;
          break;
        }
      }
    }
    never[v] = closed;
  }
}

}  // extern "C"

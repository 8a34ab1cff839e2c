package com.edgeq.demo

import android.app.Activity
import android.content.Intent
import android.os.Build
import android.os.Bundle
import android.os.Process
import android.util.Log
import android.view.WindowManager
import org.json.JSONArray
import org.json.JSONObject
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Delegate
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.Tensor
import org.tensorflow.lite.TensorFlowLite
import org.tensorflow.lite.gpu.CompatibilityList
import org.tensorflow.lite.gpu.GpuDelegate
import org.tensorflow.lite.nnapi.NnApiDelegate
import java.io.File
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import java.security.MessageDigest
import java.util.UUID
import kotlin.math.min
import kotlin.math.sqrt
import kotlin.random.Random

private const val TAG = "EDGEQ"
private const val SCHEMA = "edgeq.bench/1"

/** A bad intent extra: reported as {"error": ..., "kind": "usage"}. */
class BadExtra(message: String) : IllegalArgumentException(message)

/** What edgeq asks for, from intent extras (defaults match device_bench.py). */
data class Config(
    val model: String?, // file path; null = assets/model.tflite
    val delegate: String,
    val threads: Int,
    val warmup: Int,
    val runs: Int,
    val out: String,
    val seed: Int,
) {
    companion object {
        const val EXTRA_MODEL = "model"
        const val EXTRA_DELEGATE = "delegate"
        const val EXTRA_THREADS = "threads"
        const val EXTRA_WARMUP = "warmup"
        const val EXTRA_RUNS = "runs"
        const val EXTRA_OUT = "out"
        const val EXTRA_SEED = "seed"
        val DELEGATES = listOf("gpu", "nnapi", "xnnpack", "none", "cpu")

        /** The result file name, read on its own: even a run with bad extras writes its error there. */
        fun outName(intent: Intent): String = intent.getStringExtra(EXTRA_OUT)?.takeIf { isFileName(it) } ?: "result.json"

        fun fromIntent(intent: Intent): Config {
            val cfg = Config(
                model = intent.getStringExtra(EXTRA_MODEL),
                delegate = intent.getStringExtra(EXTRA_DELEGATE) ?: "xnnpack",
                threads = intExtra(intent, EXTRA_THREADS, 1),
                warmup = intExtra(intent, EXTRA_WARMUP, 5),
                runs = intExtra(intent, EXTRA_RUNS, 50),
                out = intent.getStringExtra(EXTRA_OUT) ?: "result.json",
                seed = intExtra(intent, EXTRA_SEED, 0),
            )
            if (cfg.delegate !in DELEGATES) throw BadExtra("unknown delegate ${cfg.delegate}; use ${DELEGATES.joinToString()}")
            if (cfg.threads < 1) throw BadExtra("threads must be at least 1, got ${cfg.threads}")
            if (cfg.warmup < 0) throw BadExtra("warmup must be 0 or more, got ${cfg.warmup}")
            if (cfg.runs < 1) throw BadExtra("runs must be at least 1, got ${cfg.runs}")
            if (!isFileName(cfg.out)) throw BadExtra("out must be a file name, got ${cfg.out}")
            return cfg
        }

        /** An int extra sent as `--ei` or, by mistake, `--es`: getIntExtra alone would silently
         * fall back to the default for a string, and the run would not be the one asked for. */
        private fun intExtra(intent: Intent, name: String, default: Int): Int {
            if (!intent.hasExtra(name)) return default
            val asInt = intent.getIntExtra(name, Int.MIN_VALUE)
            if (asInt != Int.MIN_VALUE) return asInt
            return intent.getStringExtra(name)?.trim()?.toIntOrNull()
                ?: throw BadExtra("$name must be an integer (adb shell am start --ei $name N)")
        }

        private fun isFileName(s: String) = s.isNotEmpty() && '/' !in s && s != "." && s != ".."
    }
}

/**
 * Runs one benchmark as the intent says, writes edgeq.bench/1 JSON to the app's files directory
 * (and logcat, tag EDGEQ, prefix EDGEQ_RESULT), then finishes. Started by `edgeq profile
 * --mode app`; see README.md.
 */
class MainActivity : Activity() {
    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        window.addFlags(WindowManager.LayoutParams.FLAG_KEEP_SCREEN_ON) // a dimmed screen throttles
        val out = Config.outName(intent)
        Thread {
            // Always write a result, so edgeq reports the cause instead of timing out.
            val json = try {
                runBenchmark(Config.fromIntent(intent))
            } catch (e: BadExtra) {
                errorResult(e.message ?: "bad intent extra", "usage")
            } catch (e: Throwable) {
                errorResult("${e.javaClass.simpleName}: ${e.message}", "invoke")
            }
            writeResult(out, json)
            runOnUiThread { finish() }
        }.start()
    }

    private fun loadModel(cfg: Config): ByteBuffer {
        if (cfg.model != null) {
            FileInputStream(cfg.model).use { s ->
                return s.channel.map(FileChannel.MapMode.READ_ONLY, 0, s.channel.size())
            }
        }
        assets.openFd("model.tflite").use { fd -> // the mapping outlives both closes
            FileInputStream(fd.fileDescriptor).use { s ->
                return s.channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, fd.declaredLength)
            }
        }
    }

    private fun runBenchmark(cfg: Config): JSONObject {
        val rssStart = rssMb()
        val model = loadModel(cfg)
        val modelSha = sha256(listOf(model))
        // LiteRT logs which nodes each delegate took while the interpreter is built; this run's
        // lines are the ones after this marker (see delegateCoverage).
        val marker = "EDGEQ_RUN ${UUID.randomUUID()}"
        Log.i(TAG, marker)

        val t0 = System.nanoTime()
        val options = Interpreter.Options().setNumThreads(cfg.threads)
        var delegate: Delegate? = null
        when (cfg.delegate) {
            "gpu" -> {
                // Refuse instead of silently running on the CPU. The list holds native memory:
                // its docs say callers must close it.
                val supported = CompatibilityList().use { it.isDelegateSupportedOnThisDevice }
                check(supported) { "GPU delegate is not supported on this device" }
                delegate = GpuDelegate()
            }
            "nnapi" -> delegate = NnApiDelegate()
            "xnnpack" -> options.setUseXNNPACK(true)
            else -> options.setUseXNNPACK(false) // none, cpu: the plain CPU kernels
        }
        delegate?.let { options.addDelegate(it) }
        val interpreter = try {
            Interpreter(model, options)
        } catch (e: Throwable) {
            delegate?.close()
            throw e
        }
        val initMs = (System.nanoTime() - t0) / 1e6
        val rssInit = rssMb()

        try {
            val rng = Random(cfg.seed)
            val inputs = Array<Any>(interpreter.inputTensorCount) { i -> randomInput(interpreter.getInputTensor(i), rng) }
            val outputs = HashMap<Int, Any>()
            for (i in 0 until interpreter.outputTensorCount) {
                outputs[i] = ByteBuffer.allocateDirect(interpreter.getOutputTensor(i).numBytes())
                    .order(ByteOrder.nativeOrder())
            }

            fun once(): Double {
                inputs.forEach { (it as ByteBuffer).rewind() }
                outputs.values.forEach { (it as ByteBuffer).clear() }
                val s = System.nanoTime()
                interpreter.runForMultipleInputsOutputs(inputs, outputs)
                return (System.nanoTime() - s) / 1e6
            }

            val firstMs = once()
            val warm = List(cfg.warmup) { once() }
            val timed = List(cfg.runs) { once() }
            val rssEnd = rssMb()

            val inputInfo = JSONArray()
            for (i in 0 until interpreter.inputTensorCount) {
                val t = interpreter.getInputTensor(i)
                inputInfo.put(JSONObject().put("name", t.name()).put("shape", JSONArray(t.shape().toList()))
                    .put("dtype", t.dataType().name.lowercase()))
            }
            val result = JSONObject()
                .put("schema", SCHEMA)
                .put("runner", "android_demo")
                .put("model", cfg.model?.let { File(it).name } ?: "model.tflite")
                .put("model_sha256", modelSha)
                .put("model_bytes", model.capacity())
                .put("runtime", JSONObject().put("name", "litert-android").put("version", TensorFlowLite.runtimeVersion()))
                .put("threads", cfg.threads)
                .put("delegate", cfg.delegate)
                .put("seed", cfg.seed)
                .put("init_ms", initMs)
                .put("first_inference_ms", firstMs)
                .put("warmup", JSONObject().put("count", warm.size).put("avg_ms", if (warm.isEmpty()) JSONObject.NULL else warm.average()))
                .put("runs", summarize(timed))
                .put("timings_ms", JSONArray(timed))
                .put("memory_mb", JSONObject().put("init_delta", rssInit.first - rssStart.first)
                    .put("overall_delta", rssEnd.first - rssStart.first).put("peak_rss", rssEnd.second))
                .put("inputs", inputInfo)
                .put("input_source", "random")
                .put("outputs_sha256", sha256(outputs.toSortedMap().values.map { it as ByteBuffer }))
                .put("device", JSONObject()
                    .put("model", Build.MODEL)
                    .put("manufacturer", Build.MANUFACTURER)
                    .put("android_release", Build.VERSION.RELEASE)
                    .put("sdk_int", Build.VERSION.SDK_INT)
                    .put("abi", Build.SUPPORTED_ABIS.firstOrNull() ?: "")
                    .put("machine", Build.SUPPORTED_ABIS.firstOrNull() ?: "")
                    .put("system", "Android"))
            // Read after the runs: XNNPACK (the default CPU delegate) is applied at the first run.
            try {
                result.put("delegate_coverage", delegateCoverage(cfg.delegate, ownLogSince(marker), primaryNodeCount(model))
                    ?: JSONObject.NULL)
            } catch (e: Exception) {
                // No coverage is not "full coverage": edgeq treats a missing report as unknown.
                result.put("delegate_coverage", JSONObject.NULL)
                    .put("delegate_coverage_error", "${e.javaClass.simpleName}: ${e.message}")
            }
            return result
        } finally {
            interpreter.close()
            delegate?.close()
        }
    }

    /** Temp file + rename: edgeq polls for the file, and must never read half of it. */
    private fun writeResult(name: String, json: JSONObject) {
        val dir = getExternalFilesDir(null) ?: filesDir
        val tmp = File(dir, "$name.tmp")
        tmp.writeText(json.toString())
        tmp.renameTo(File(dir, name))
        Log.i(TAG, "EDGEQ_RESULT $json")
    }
}

fun errorResult(message: String, kind: String): JSONObject =
    JSONObject().put("schema", SCHEMA).put("error", message).put("kind", kind)

/**
 * Random inputs the model accepts, as device_bench.py's make_inputs makes them: quantized integers
 * over their whole range; plain integers are token ids, masks or token types, so 0/1 (valid ids
 * for any vocabulary: the Java API cannot list ops to find an embedding table's size); bool 0/1;
 * floats in [0, 1).
 */
fun randomInput(t: Tensor, rng: Random): ByteBuffer {
    val buf = ByteBuffer.allocateDirect(t.numBytes()).order(ByteOrder.nativeOrder())
    val quantized = t.quantizationParams().scale != 0f
    when (t.dataType()) {
        DataType.FLOAT32 -> while (buf.remaining() >= 4) buf.putFloat(rng.nextFloat())
        DataType.INT32 -> if (quantized) fillBytes(buf, rng) else while (buf.remaining() >= 4) buf.putInt(rng.nextInt(2))
        DataType.INT64 -> if (quantized) fillBytes(buf, rng) else while (buf.remaining() >= 8) buf.putLong(rng.nextInt(2).toLong())
        DataType.INT16 -> if (quantized) fillBytes(buf, rng) else while (buf.remaining() >= 2) buf.putShort(rng.nextInt(2).toShort())
        DataType.INT8, DataType.UINT8 -> if (quantized) fillBytes(buf, rng) else while (buf.hasRemaining()) buf.put(rng.nextInt(2).toByte())
        DataType.BOOL -> while (buf.hasRemaining()) buf.put(rng.nextInt(2).toByte())
        else -> fillBytes(buf, rng)
    }
    buf.rewind()
    return buf
}

private fun fillBytes(buf: ByteBuffer, rng: Random) {
    while (buf.hasRemaining()) buf.put(rng.nextInt(256).toByte())
}

/** count/min/max/mean/std/p5/median/p95 exactly as edgeq's device_bench.py computes them. */
fun summarize(times: List<Double>): JSONObject {
    if (times.isEmpty()) return JSONObject().put("count", 0)
    val s = times.sorted()
    val mean = s.average()
    val std = sqrt(s.sumOf { (it - mean) * (it - mean) } / s.size) // population std, like benchmark_model
    fun pct(q: Double): Double {
        val k = (s.size - 1) * q / 100.0
        val lo = k.toInt()
        val hi = min(lo + 1, s.size - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)
    }
    return JSONObject().put("count", s.size).put("min_ms", s.first()).put("max_ms", s.last())
        .put("mean_ms", mean).put("std_ms", std).put("p5_ms", pct(5.0)).put("median_ms", pct(50.0))
        .put("p95_ms", pct(95.0))
}

/** One "Replacing N [out of M] node(s) with delegate (NAME) node, yielding K partitions" line. */
data class Delegation(val delegated: Int, val total: Int?, val kernel: String, val partitions: Int?)

private val REPLACING = Regex(
    """Replacing (\d+) (?:out of (\d+) )?node\(s\) with delegate \(([^)]*)\) node(?:, yielding (\d+) partitions)?""")

/** Lower-case parts of the names a requested delegate's kernel has in LiteRT's log
 * (TfLiteGpuDelegateV2, TfLiteNnapiDelegate, TfLiteXNNPackDelegate); as edgeq's runners/adb.py. */
val DELEGATE_LOG_NAMES = mapOf("gpu" to listOf("gpu", "litert_cl"), "nnapi" to listOf("nnapi"), "xnnpack" to listOf("xnnpack"))

fun parseDelegations(log: String): List<Delegation> = REPLACING.findAll(log).map { m ->
    Delegation(m.groupValues[1].toInt(), m.groupValues[2].toIntOrNull(), m.groupValues[3], m.groupValues[4].toIntOrNull())
}.toList()

/**
 * How much of the graph the requested delegate took, from LiteRT's own log: one Replacing line per
 * (sub)graph it took nodes from, the line benchmark_model prints too (LiteRT 1.4.0 logs it at
 * VERBOSE, which its Android logger prints by default as I/tflite: tflite/core/subgraph.cc,
 * tflite/minimal_logging_android.cc). No line means it took nothing (execution "none"): the whole
 * graph ran on the CPU, whatever the delegate's creation said. total is the lines' node count,
 * else (older log format, or no line) the model's primary subgraph's. null for delegate none/cpu.
 */
fun delegateCoverage(requested: String, log: String, modelNodes: Int): JSONObject? {
    val names = DELEGATE_LOG_NAMES[requested] ?: return null
    val mine = parseDelegations(log).filter { d -> names.any { it in d.kernel.lowercase() } }
    val delegated = mine.sumOf { it.delegated }
    val total = if (mine.isNotEmpty() && mine.all { it.total != null }) mine.sumOf { it.total ?: 0 } else modelNodes
    val execution = when {
        delegated == 0 -> "none"
        delegated >= total -> "complete"
        else -> "partial"
    }
    return JSONObject()
        .put("delegate", requested)
        .put("kernel", mine.lastOrNull()?.kernel ?: JSONObject.NULL)
        .put("execution", execution)
        .put("delegated", delegated)
        .put("total", total)
        .put("ratio", if (total > 0) min(1.0, delegated.toDouble() / total) else JSONObject.NULL)
        .put("partitions", if (mine.isNotEmpty() && mine.all { it.partitions != null }) mine.sumOf { it.partitions ?: 0 } else JSONObject.NULL)
        .put("source", "logcat")
}

/** This process's EDGEQ and tflite log lines after `marker`: an app reads its own log without any
 * permission (logcat shows an app only its own lines). Fails when the marker is not there. */
fun ownLogSince(marker: String): String {
    val p = ProcessBuilder("logcat", "-d", "-v", "brief", "--pid=${Process.myPid()}", "-s", "$TAG:I", "tflite:I")
        .redirectErrorStream(true).start()
    val text = p.inputStream.bufferedReader().use { it.readText() }
    p.waitFor()
    val at = text.lastIndexOf(marker)
    check(at >= 0) { "logcat did not return this run's log (${text.lineSequence().firstOrNull()?.take(200) ?: "no output"})" }
    return text.substring(at + marker.length)
}

/** Operators in the model's primary subgraph (Model.subgraphs[0].operators of the .tflite
 * flatbuffer, schema.fbs): the node count a delegate's coverage is out of. */
fun primaryNodeCount(model: ByteBuffer): Int {
    val b = model.duplicate().order(ByteOrder.LITTLE_ENDIAN) // duplicate() resets the byte order
    fun deref(pos: Int) = pos + b.getInt(pos) // follow a uoffset_t
    fun field(table: Int, index: Int): Int? { // absolute position of a table field, null if absent
        val vtable = table - b.getInt(table)
        val slot = 4 + 2 * index
        if (slot >= (b.getShort(vtable).toInt() and 0xffff)) return null
        val offset = b.getShort(vtable + slot).toInt() and 0xffff
        return if (offset == 0) null else table + offset
    }
    val root = deref(0)
    val subgraphs = deref(field(root, 2) ?: return 0) // Model: version, operator_codes, subgraphs
    if (b.getInt(subgraphs) == 0) return 0
    val first = deref(subgraphs + 4)
    val operators = field(first, 3) ?: return 0 // SubGraph: tensors, inputs, outputs, operators
    return b.getInt(deref(operators))
}

/** (current RSS, peak RSS) in MB from /proc/self/status, as device_bench.py reads them. */
fun rssMb(): Pair<Double, Double> {
    var cur = 0.0
    var peak = 0.0
    File("/proc/self/status").forEachLine { line ->
        val kb = line.split(Regex("\\s+")).getOrNull(1)?.toDoubleOrNull() ?: return@forEachLine
        if (line.startsWith("VmRSS:")) cur = kb / 1024.0
        if (line.startsWith("VmHWM:")) peak = kb / 1024.0
    }
    return Pair(cur, peak)
}

fun sha256(buffers: List<ByteBuffer>): String {
    val md = MessageDigest.getInstance("SHA-256")
    buffers.forEach { md.update(it.duplicate().apply { rewind() }) }
    return md.digest().joinToString("") { "%02x".format(it) }
}

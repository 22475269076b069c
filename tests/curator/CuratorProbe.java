// Apache Curator's own service discovery, driven by tests/test_it_curator.py
// to show that pipecomet and JVM services using Curator see each other.
//
//   CuratorProbe <connect> <basePath> <service> list
//       prints one JSON line per instance Curator finds, then "done"
//   CuratorProbe <connect> <basePath> <service> register <id> <address> <port> <zone>
//       registers a DYNAMIC instance (payload {"zone": zone}), prints
//       "registered", unregisters and exits when stdin closes or says "stop"
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.util.LinkedHashMap;
import java.util.Map;
import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.ServiceType;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;

public class CuratorProbe {
    @SuppressWarnings({"rawtypes", "unchecked"})
    public static void main(String[] args) throws Exception {
        String connect = args[0], basePath = args[1], service = args[2], mode = args[3];
        CuratorFramework client = CuratorFrameworkFactory.newClient(
            connect, 10000, 10000, new RetryNTimes(3, 200));
        client.start();
        if (!client.blockUntilConnected(30, java.util.concurrent.TimeUnit.SECONDS)) {
            throw new IllegalStateException("no connection to " + connect);
        }
        ServiceDiscovery<Map> discovery = ServiceDiscoveryBuilder.builder(Map.class)
            .client(client).basePath(basePath)
            .serializer(new JsonInstanceSerializer<>(Map.class)).build();
        discovery.start();
        ObjectMapper json = new ObjectMapper();
        if (mode.equals("list")) {
            for (ServiceInstance<Map> instance : discovery.queryForInstances(service)) {
                Map<String, Object> out = new LinkedHashMap<>();
                out.put("name", instance.getName());
                out.put("id", instance.getId());
                out.put("address", instance.getAddress());
                out.put("port", instance.getPort());
                out.put("sslPort", instance.getSslPort());
                out.put("payload", instance.getPayload());
                out.put("registrationTimeUTC", instance.getRegistrationTimeUTC());
                out.put("serviceType", instance.getServiceType().name());
                out.put("enabled", instance.isEnabled());
                System.out.println(json.writeValueAsString(out));
            }
            System.out.println("done");
        } else if (mode.equals("register")) {
            Map<String, Object> payload = new LinkedHashMap<>();
            payload.put("zone", args[7]);
            ServiceInstance<Map> instance = ServiceInstance.<Map>builder()
                .name(service).id(args[4]).address(args[5]).port(Integer.parseInt(args[6]))
                .payload(payload).serviceType(ServiceType.DYNAMIC).build();
            discovery.registerService(instance);
            System.out.println("registered");
            System.out.flush();
            BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
            String line;
            while ((line = in.readLine()) != null && !line.equals("stop")) {
            }
            discovery.unregisterService(instance);
            System.out.println("unregistered");
        } else {
            throw new IllegalArgumentException("mode: list or register");
        }
        System.out.flush();
        discovery.close();
        client.close();
    }
}
